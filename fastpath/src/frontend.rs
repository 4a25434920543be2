//! The service table's frontend index: (address, protocol, port) → (index
//! of the service port, how it is reached).
//!
//! A flat open-addressing table (linear probing, at most half full, removal
//! by backward shift, so no tombstones) of 32-byte entries, two per cache
//! line. Unlike a general-purpose hash map it tells where a key's probe
//! starts, so a batch can prefetch that line one pass before it looks the
//! key up ([`FrontendIndex::prefetch`]): with 10,000 Services the index is
//! larger than the core's private caches, and the lookup of each new flow's
//! frontend was a cache miss that nothing overlapped.
//!
//! Lookups read only; inserts and removals happen while the control plane
//! builds a table, never on the fast path. Nothing here is unsafe.

use xskgate_conntrack::{Addr, Proto, prefetch_line};

/// How a frontend is reached; decides the traffic class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalIp,
}

impl FrontendKind {
    /// The name used in `xskgate table --json`.
    pub fn name(self) -> &'static str {
        match self {
            FrontendKind::ClusterIp => "ClusterIP",
            FrontendKind::NodePort => "NodePort",
            FrontendKind::LoadBalancer => "LoadBalancer",
            FrontendKind::ExternalIp => "ExternalIP",
        }
    }
}

/// `index` of an empty entry.
const EMPTY: u32 = u32::MAX;
/// Capacity of the first allocation.
const MIN_CAPACITY: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(32))]
struct Entry {
    addr: Addr,
    /// Index of the service port, or [`EMPTY`].
    index: u32,
    port: u16,
    proto: Proto,
    kind: FrontendKind,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 32);

const VACANT: Entry =
    Entry { addr: Addr::UNSPECIFIED, index: EMPTY, port: 0, proto: Proto(0), kind: FrontendKind::ClusterIp };

/// See the module documentation.
#[derive(Clone, Debug, Default)]
pub(crate) struct FrontendIndex {
    /// A power of two long (or empty).
    entries: Box<[Entry]>,
    len: usize,
}

/// The hash of a frontend key: both address words and (protocol, port)
/// folded by 128-bit multiplications.
#[inline]
fn hash(addr: &Addr, proto: Proto, port: u16) -> u64 {
    let fold = |a: u64, b: u64| {
        let p = u128::from(a) * u128::from(b);
        (p as u64) ^ ((p >> 64) as u64)
    };
    let [w0, w1] = [0, 8].map(|at| u64::from_le_bytes(addr.0[at..at + 8].try_into().expect("8 bytes")));
    let rest = u64::from(port) << 8 | u64::from(proto.0);
    fold(fold(w0 ^ 0x243f_6a88_85a3_08d3, w1 ^ 0x1319_8a2e_0370_7344) ^ rest, 0xa409_3822_299f_31d0)
}

impl FrontendIndex {
    #[inline]
    fn home(&self, addr: &Addr, proto: Proto, port: u16) -> usize {
        hash(addr, proto, port) as usize & (self.entries.len() - 1)
    }

    /// The slot holding the key, or the empty slot where its probe ends.
    #[inline]
    fn probe(&self, addr: &Addr, proto: Proto, port: u16) -> usize {
        let mask = self.entries.len() - 1;
        let mut i = self.home(addr, proto, port);
        loop {
            let e = &self.entries[i];
            if e.index == EMPTY || (e.addr == *addr && e.port == port && e.proto == proto) {
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// The service port index and kind of the frontend, if there is one.
    #[inline]
    pub(crate) fn get(&self, addr: &Addr, proto: Proto, port: u16) -> Option<(u32, FrontendKind)> {
        if self.entries.is_empty() {
            return None;
        }
        let e = &self.entries[self.probe(addr, proto, port)];
        (e.index != EMPTY).then_some((e.index, e.kind))
    }

    /// Starts loading the line where the key's probe starts (almost always
    /// the only line a lookup reads, as the index is at most half full).
    #[inline]
    pub(crate) fn prefetch(&self, addr: &Addr, proto: Proto, port: u16) {
        if !self.entries.is_empty() {
            prefetch_line(std::ptr::from_ref(&self.entries[self.home(addr, proto, port)]).cast());
        }
    }

    /// Adds the frontend or replaces its value.
    pub(crate) fn insert(&mut self, addr: Addr, proto: Proto, port: u16, index: u32, kind: FrontendKind) {
        debug_assert_ne!(index, EMPTY);
        if 2 * (self.len + 1) > self.entries.len() {
            self.grow();
        }
        let i = self.probe(&addr, proto, port);
        if self.entries[i].index == EMPTY {
            self.len += 1;
        }
        self.entries[i] = Entry { addr, index, port, proto, kind };
    }

    /// Removes the frontend; returns its value.
    pub(crate) fn remove(&mut self, addr: &Addr, proto: Proto, port: u16) -> Option<(u32, FrontendKind)> {
        if self.entries.is_empty() {
            return None;
        }
        let mask = self.entries.len() - 1;
        let mut hole = self.probe(addr, proto, port);
        let removed = self.entries[hole];
        if removed.index == EMPTY {
            return None;
        }
        // Backward shift: every later entry of the run whose home is not
        // cyclically in (hole, j] moves into the hole, so that each key
        // stays reachable from its home without tombstones.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e.index == EMPTY {
                break;
            }
            let home = self.home(&e.addr, e.proto, e.port);
            let stays = if hole <= j { hole < home && home <= j } else { hole < home || home <= j };
            if !stays {
                self.entries[hole] = e;
                hole = j;
            }
        }
        self.entries[hole] = VACANT;
        self.len -= 1;
        Some((removed.index, removed.kind))
    }

    fn grow(&mut self) {
        let capacity = (self.entries.len() * 2).max(MIN_CAPACITY);
        let old = std::mem::replace(&mut self.entries, vec![VACANT; capacity].into_boxed_slice());
        self.len = 0;
        for e in old.iter().filter(|e| e.index != EMPTY) {
            self.insert(e.addr, e.proto, e.port, e.index, e.kind);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn key(k: u16) -> (Addr, Proto, u16) {
        // Few distinct values per field, so that keys collide in every part.
        let addr = if k & 1 == 0 {
            Addr::from_v4([198, 18, 0, (k >> 1) as u8 % 8])
        } else {
            Addr::from_v6([0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, (k >> 1) as u8 % 8])
        };
        let proto = if k & 16 == 0 { Proto::TCP } else { Proto::UDP };
        (addr, proto, 80 + (k >> 5) % 8)
    }

    proptest! {
        /// Any sequence of inserts and removals leaves the index equal to a
        /// `HashMap` given the same operations, every key findable, every
        /// removed key gone, and the index at most half full.
        #[test]
        fn agrees_with_a_hash_map(ops in prop::collection::vec((any::<bool>(), any::<u16>(), any::<u32>()), 0..400)) {
            let mut index = FrontendIndex::default();
            let mut model = HashMap::new();
            for (insert, k, value) in ops {
                let (addr, proto, port) = key(k);
                let value = value % 1000;
                if insert {
                    index.insert(addr, proto, port, value, FrontendKind::LoadBalancer);
                    model.insert((addr, proto, port), value);
                } else {
                    let got = index.remove(&addr, proto, port).map(|(v, _)| v);
                    prop_assert_eq!(got, model.remove(&(addr, proto, port)));
                }
                prop_assert_eq!(index.len, model.len());
                prop_assert!(2 * index.len <= index.entries.len());
            }
            for k in 0..512u16 {
                let (addr, proto, port) = key(k);
                let want = model.get(&(addr, proto, port)).map(|&v| (v, FrontendKind::LoadBalancer));
                prop_assert_eq!(index.get(&addr, proto, port), want);
            }
        }
    }

    #[test]
    fn empty_index_finds_nothing_and_removes_nothing() {
        let mut index = FrontendIndex::default();
        let (addr, proto, port) = key(0);
        index.prefetch(&addr, proto, port);
        assert_eq!(index.get(&addr, proto, port), None);
        assert_eq!(index.remove(&addr, proto, port), None);
    }
}
