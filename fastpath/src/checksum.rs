//! Internet checksums (RFC 1071) and their incremental update (RFC 1624).
//!
//! All functions work on big-endian 16-bit words. [`Incremental`] applies
//! RFC 1624 equation 3, `HC' = ~(~HC + ~m + m')`, which never produces the
//! `-0` (0xffff → 0x0000) error of equation 2. Pure; never panics.

/// Folds a 64-bit one's-complement accumulator to 16 bits (the conntrack
/// table folds its precomputed NAT deltas with the same function).
pub use xskgate_conntrack::fold_checksum as fold;

/// One's-complement sum of `data` as big-endian words (odd byte padded).
pub fn sum(data: &[u8]) -> u64 {
    let mut acc = 0u64;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(u16::from_be_bytes([*last, 0]));
    }
    acc
}

/// The checksum of data whose one's-complement sum is `acc`.
#[inline]
pub fn finish(acc: u64) -> u16 {
    !fold(acc)
}

/// Pseudo-header sum for TCP/UDP/ICMPv6 (IPv4 or IPv6 form).
pub fn pseudo_header(src: &[u8], dst: &[u8], proto: u8, len: u32) -> u64 {
    sum(src) + sum(dst) + u64::from(proto) + u64::from(len >> 16) + u64::from(len & 0xffff)
}

/// An incremental checksum update in progress.
#[derive(Clone, Copy, Debug)]
pub struct Incremental {
    acc: u64,
}

impl Incremental {
    /// Starts from the checksum currently in the packet.
    #[inline]
    pub fn new(checksum: u16) -> Incremental {
        Incremental { acc: u64::from(!checksum) }
    }

    /// Accounts for one 16-bit word changing from `old` to `new`.
    #[inline]
    pub fn word(&mut self, old: u16, new: u16) {
        self.acc += u64::from(!old) + u64::from(new);
    }

    /// Accounts for an even-length, word-aligned field changing.
    #[inline]
    pub fn bytes(&mut self, old: &[u8], new: &[u8]) {
        debug_assert_eq!(old.len(), new.len());
        for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
            self.word(u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([n[0], n[1]]));
        }
    }

    /// Accounts for changes already summed as `~m + m'` over their words.
    #[inline]
    pub fn add(&mut self, delta: u64) {
        self.acc += delta;
    }

    /// The updated checksum.
    #[inline]
    pub fn finish(self) -> u16 {
        !fold(self.acc)
    }
}

/// `checksum` updated by one delta already summed as `~m + m'` (RFC 1624
/// eqn. 3), for the per-packet rewrite: the same result as [`Incremental`]
/// with one [`Incremental::add`], in two end-around-carry steps (a sum of
/// two 16-bit words and a delta below 2^31 folds to 16 bits in two:
/// `< 2^32` → `<= 0x1fffe` → `<= 0xffff`).
#[inline(always)]
pub fn update(checksum: u16, delta: u32) -> u16 {
    debug_assert!(delta < 1 << 31);
    let s = u32::from(!checksum) + delta;
    let s = (s & 0xffff) + (s >> 16);
    let s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn full(data: &[u8]) -> u16 {
        finish(sum(data))
    }

    proptest! {
        /// The two-step update equals the general one.
        #[test]
        fn update_equals_incremental(checksum: u16, delta in 0u32..1 << 31) {
            let mut general = Incremental::new(checksum);
            general.add(u64::from(delta));
            prop_assert_eq!(update(checksum, delta), general.finish());
        }

        /// Incremental update equals full recomputation, for any data and
        /// any word-aligned change; the updated packet always verifies.
        #[test]
        fn incremental_equals_full(mut data in prop::collection::vec(any::<u8>(), 4..200),
                                   at in any::<prop::sample::Index>(),
                                   new in prop::collection::vec(any::<u8>(), 2..20)) {
            // Word 0 is the checksum field, as in real headers; the change
            // covers whole words somewhere after it.
            let words = data.len() / 2;
            let first = 1 + at.index(words - 1);
            let n = (new.len() / 2).min(words - first);
            let (start, len) = (first * 2, n * 2);
            data[..2].copy_from_slice(&[0, 0]);
            let c = full(&data);
            data[..2].copy_from_slice(&c.to_be_bytes());
            let mut inc = Incremental::new(c);
            inc.bytes(&data[start..start + len], &new[..len]);
            data[start..start + len].copy_from_slice(&new[..len]);
            let updated = inc.finish();
            data[..2].copy_from_slice(&[0, 0]);
            let recomputed = full(&data);
            // One's complement has two zeros (0x0000 and 0xffff); RFC 1624
            // eqn. 3 equals recomputation except that it may pick the other.
            prop_assert!(updated == recomputed || (fold(u64::from(updated)) | fold(u64::from(recomputed))) == 0xffff,
                "updated {:#06x} recomputed {:#06x}", updated, recomputed);
            data[..2].copy_from_slice(&updated.to_be_bytes());
            prop_assert_eq!(fold(sum(&data)), 0xffff, "the packet must verify");
        }

        /// The loop-free fold equals folding until no carry is left, for
        /// any accumulator (small ones, as the fast path has, and the
        /// largest).
        #[test]
        fn fold_equals_repeated_end_around_carry(x in prop_oneof![any::<u64>(), 0u64..0x40000, (u64::MAX - 0x40000)..=u64::MAX]) {
            let mut s = x;
            while s >> 16 != 0 {
                s = (s & 0xffff) + (s >> 16);
            }
            prop_assert_eq!(fold(x), s as u16);
        }
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3 example words: 0001 f203 f4f5 f6f7 -> sum ddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&d)), 0xddf2);
        assert_eq!(finish(sum(&d)), !0xddf2);
    }
}
