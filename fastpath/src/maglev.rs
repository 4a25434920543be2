//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) for endpoint choice.
//!
//! The lookup table has a prime size `M ≥ 100·N` (N endpoints), taken from a
//! fixed ladder of primes near powers of two so that M does not change when
//! one endpoint comes or goes (a new M would reshuffle every flow). Every
//! endpoint gets ⌊M/N⌋ or ⌈M/N⌉ entries (so shares differ by at most 1 %),
//! and removing one of N endpoints moves the 1/N of the flows that were on
//! it plus at most about 1.7/N others (measured for N up to 120). When N
//! crosses a step of the ladder (each time it doubles) the table is rebuilt
//! at the other size and most new flows map anew; established flows keep
//! their endpoint through conntrack either way. Hashes are
//! fixed functions of the endpoint's address and port, and endpoints are
//! taken in a canonical (sorted) order: every gateway builds the same table
//! from the same endpoints, so a flow picks the same endpoint everywhere.
//! Building allocates; [`Maglev::pick`] does not.

use xskgate_conntrack::Addr;

/// A Maglev lookup table over N endpoints (indices into the caller's list).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Maglev {
    entries: Box<[u16]>,
}

/// Most endpoints one table can hold (entries are `u16` indices).
pub const MAX_ENDPOINTS: usize = u16::MAX as usize;

/// Primes just below powers of two, 2^8 to 2^23.
const SIZES: [usize; 16] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071, 262_139, 524_287, 1_048_573, 2_097_143, 4_194_301,
    8_388_593,
];

#[cfg(test)]
fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The table size for `n` endpoints: the smallest size of the ladder that
/// is ≥ 100·n (0 for none).
pub fn table_size(n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    let want = 100 * n.min(MAX_ENDPOINTS);
    SIZES.iter().copied().find(|&m| m >= want).unwrap_or(SIZES[SIZES.len() - 1])
}

#[inline]
fn mix(a: u64, b: u64) -> u64 {
    let p = u128::from(a ^ 0x9e37_79b9_7f4a_7c15) * u128::from(b ^ 0xc2b2_ae3d_27d4_eb4f);
    (p as u64) ^ ((p >> 64) as u64)
}

/// A fixed (unseeded) hash of an endpoint, identical on every gateway.
pub fn endpoint_hash(addr: &Addr, port: u16, salt: u64) -> u64 {
    let a = u64::from_be_bytes(addr.0[..8].try_into().expect("8 bytes"));
    let b = u64::from_be_bytes(addr.0[8..].try_into().expect("8 bytes"));
    mix(mix(a, salt), mix(b, u64::from(port) ^ salt.rotate_left(17)))
}

impl Maglev {
    /// Builds the table for endpoints in the given order (the caller sorts
    /// them canonically). Endpoints past [`MAX_ENDPOINTS`] are ignored.
    pub fn new(endpoints: &[(Addr, u16)]) -> Maglev {
        let endpoints = &endpoints[..endpoints.len().min(MAX_ENDPOINTS)];
        let n = endpoints.len();
        let m = table_size(n);
        if m == 0 {
            return Maglev::default();
        }
        let m64 = m as u64;
        let perm: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|(a, p)| {
                let offset = endpoint_hash(a, *p, 0x6d61_676c_6576_3031) % m64;
                let skip = endpoint_hash(a, *p, 0x736b_6970_7370_3032) % (m64 - 1) + 1;
                (offset, skip)
            })
            .collect();
        const EMPTY: u16 = u16::MAX;
        let mut entries = vec![EMPTY; m];
        // Each endpoint walks its permutation `offset + j·skip (mod M)`; the
        // position is advanced by one addition and one conditional
        // subtraction instead of a multiplication and a division.
        let mut pos: Vec<u64> = perm.iter().map(|&(offset, _)| offset).collect();
        let mut filled = 0;
        'fill: loop {
            for (i, &(_, skip)) in perm.iter().enumerate() {
                let mut c = pos[i];
                while entries[c as usize] != EMPTY {
                    c += skip;
                    if c >= m64 {
                        c -= m64;
                    }
                }
                entries[c as usize] = i as u16;
                c += skip;
                if c >= m64 {
                    c -= m64;
                }
                pos[i] = c;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Maglev { entries: entries.into_boxed_slice() }
    }

    /// The endpoint index for a flow hash, or `None` without endpoints.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> Option<usize> {
        if self.entries.is_empty() {
            return None;
        }
        let i = ((u128::from(flow_hash) * self.entries.len() as u128) >> 64) as usize;
        Some(usize::from(self.entries[i]))
    }

    /// Starts loading the entry [`Maglev::pick`] reads for `flow_hash`.
    #[inline]
    pub fn prefetch(&self, flow_hash: u64) {
        let i = ((u128::from(flow_hash) * self.entries.len() as u128) >> 64) as usize;
        if let Some(e) = self.entries.get(i) {
            xskgate_conntrack::prefetch_line(std::ptr::from_ref(e).cast());
        }
    }

    /// Table size M.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many table entries each endpoint owns (for tests and metrics).
    pub fn shares(&self, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &e in self.entries.iter() {
            counts[usize::from(e)] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn eps(n: usize, base: u8) -> Vec<(Addr, u16)> {
        (0..n).map(|i| (Addr::from(Ipv4Addr::new(198, 19, base, i as u8)), 8080 + (i / 256) as u16)).collect()
    }

    #[test]
    fn sizes_are_primes_at_least_100n() {
        assert_eq!(table_size(0), 0);
        assert_eq!(table_size(1), 251);
        assert_eq!(table_size(3), 509);
        assert_eq!(table_size(10), 1021);
        assert!(SIZES.iter().all(|&m| is_prime(m as u64)));
        for n in (1..2000).chain([MAX_ENDPOINTS]) {
            let m = table_size(n);
            assert!(m >= 100 * n && is_prime(m as u64));
        }
    }

    /// The paper's algorithm, with a multiplication and a division per probe.
    fn reference(endpoints: &[(Addr, u16)]) -> Vec<u16> {
        let m = table_size(endpoints.len()) as u64;
        let perm: Vec<(u64, u64)> = endpoints
            .iter()
            .map(|(a, p)| {
                (
                    endpoint_hash(a, *p, 0x6d61_676c_6576_3031) % m,
                    endpoint_hash(a, *p, 0x736b_6970_7370_3032) % (m - 1) + 1,
                )
            })
            .collect();
        let mut entries = vec![u16::MAX; m as usize];
        let mut next = vec![0u64; endpoints.len()];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip)) in perm.iter().enumerate() {
                let mut c = (offset + next[i] * skip) % m;
                while entries[c as usize] != u16::MAX {
                    next[i] += 1;
                    c = (offset + next[i] * skip) % m;
                }
                entries[c as usize] = i as u16;
                next[i] += 1;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        entries
    }

    #[test]
    fn incremental_walk_equals_the_papers_algorithm() {
        for n in [1, 2, 3, 10, 33, 100] {
            let e = eps(n, 5);
            assert_eq!(&*Maglev::new(&e).entries, &reference(&e)[..], "n = {n}");
        }
    }

    #[test]
    fn same_endpoints_give_the_same_table_everywhere() {
        let a = Maglev::new(&eps(7, 1));
        let b = Maglev::new(&eps(7, 1));
        assert_eq!(a, b);
        assert_ne!(a, Maglev::new(&eps(7, 2)));
        assert_eq!(Maglev::new(&[]).pick(42), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// With M > 100·N every endpoint's share is within 1 % of the others'.
        #[test]
        fn spread_is_within_one_percent(n in 1usize..120, base in any::<u8>()) {
            let m = Maglev::new(&eps(n, base));
            let shares = m.shares(n);
            let (lo, hi) = (*shares.iter().min().unwrap(), *shares.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "shares differ by {}", hi - lo);
            prop_assert!((hi - lo) as f64 / (m.len() as f64 / n as f64) <= 0.01);
        }

        /// Removing one of N endpoints moves about 1/N of the flows: those on
        /// the removed endpoint must move, and few others do (while M stays).
        #[test]
        fn removing_one_endpoint_moves_about_one_nth(n in 3usize..40, gone in any::<prop::sample::Index>(), seed in any::<u64>()) {
            prop_assume!(table_size(n) == table_size(n - 1));
            let all = eps(n, 7);
            let g = gone.index(n);
            let mut rest = all.clone();
            rest.remove(g);
            let (before, after) = (Maglev::new(&all), Maglev::new(&rest));
            let flows = 20_000u64;
            let mut moved_others = 0u64;
            for f in 0..flows {
                let h = mix(f, seed);
                let a = all[before.pick(h).unwrap()];
                let b = rest[after.pick(h).unwrap()];
                if a != all[g] && a != b {
                    moved_others += 1;
                }
            }
            // Maglev's disruption is near minimal, not minimal: besides the
            // 1/N that must move, at most 1.7/N more moved in a sweep of
            // N = 3..120 (M ≥ 100·N); allow 2/N.
            let frac = moved_others as f64 / flows as f64;
            prop_assert!(frac <= 2.0 / n as f64, "{} of flows on surviving endpoints moved (n = {})", frac, n);
        }
    }
}
