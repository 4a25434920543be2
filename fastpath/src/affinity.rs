//! `sessionAffinity: ClientIP`: which endpoint a client last used for a
//! service port, shared by all workers, lock-free, fixed size.
//!
//! kube-proxy keeps this in the `recent` iptables module: a new connection
//! from a client whose entry is younger than `timeoutSeconds` goes to the
//! same endpoint, and every such connection refreshes the entry. Here a
//! set-associative cache of (service port, client) → (endpoint id, last
//! used) does the same. A full set evicts its least recently used way, so
//! under extreme client churn an affinity can be forgotten early (counted by
//! the caller as a normal choice); the chosen endpoint is always validated
//! against the service's current endpoints.
//!
//! Each way is two atomic words. A reader takes the value only if the key
//! word reads the same before and after it; a writer clears the key first,
//! so a reader never pairs one client's key with another's value. Two
//! writers of the same way may interleave; the worst outcome is a stale or
//! lost affinity, never a torn one. No allocation after `new`, no lock.

use std::sync::atomic::{AtomicU64, Ordering::Acquire, Ordering::Relaxed, Ordering::Release};
use xskgate_conntrack::Addr;

const WAYS: usize = 4;

#[derive(Default)]
struct Way {
    key: AtomicU64,
    /// endpoint id << 32 | last used (seconds)
    value: AtomicU64,
}

/// The shared affinity table.
pub struct AffinityTable {
    ways: Box<[Way]>,
    sets: usize,
}

impl std::fmt::Debug for AffinityTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AffinityTable").field("entries", &self.ways.len()).finish()
    }
}

fn key_of(service: u32, client: &Addr) -> u64 {
    let a = u64::from_be_bytes(client.0[..8].try_into().expect("8 bytes"));
    let b = u64::from_be_bytes(client.0[8..].try_into().expect("8 bytes"));
    let p = u128::from(a ^ 0x243f_6a88_85a3_08d3 ^ u64::from(service)) * u128::from(b ^ 0x1319_8a2e_0370_7344);
    ((p as u64) ^ ((p >> 64) as u64)) | 1 // never 0: 0 marks an empty way
}

impl AffinityTable {
    /// A table for about `entries` (client, service port) pairs.
    pub fn new(entries: usize) -> AffinityTable {
        let sets = entries.div_ceil(WAYS).max(1).next_power_of_two();
        AffinityTable { ways: (0..sets * WAYS).map(|_| Way::default()).collect(), sets }
    }

    fn set(&self, key: u64) -> &[Way] {
        let s = ((key >> 32) as usize) & (self.sets - 1);
        &self.ways[s * WAYS..(s + 1) * WAYS]
    }

    /// The endpoint id `client` used for `service` within `timeout` seconds.
    #[inline]
    pub fn get(&self, service: u32, client: &Addr, now: u32, timeout: u32) -> Option<u32> {
        let key = key_of(service, client);
        for w in self.set(key) {
            if w.key.load(Acquire) != key {
                continue;
            }
            let v = w.value.load(Acquire);
            if w.key.load(Acquire) != key {
                continue;
            }
            let last = v as u32;
            return (now.saturating_sub(last) < timeout).then_some((v >> 32) as u32);
        }
        None
    }

    /// Records (or refreshes) that `client` uses `endpoint` for `service`.
    pub fn record(&self, service: u32, client: &Addr, endpoint: u32, now: u32) {
        let key = key_of(service, client);
        let set = self.set(key);
        let value = u64::from(endpoint) << 32 | u64::from(now);
        // The same key's way, else an empty one, else the least recently used.
        let way = set
            .iter()
            .find(|w| w.key.load(Relaxed) == key)
            .or_else(|| set.iter().find(|w| w.key.load(Relaxed) == 0))
            .unwrap_or_else(|| set.iter().min_by_key(|w| w.value.load(Relaxed) as u32).expect("4 ways"));
        if way.key.load(Relaxed) == key {
            way.value.store(value, Release);
            return;
        }
        way.key.store(0, Release);
        way.value.store(value, Release);
        way.key.store(key, Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_the_timeout_and_refreshes() {
        let t = AffinityTable::new(1024);
        let c = Addr::from_v4([198, 18, 0, 7]);
        assert_eq!(t.get(1, &c, 100, 10_800), None);
        t.record(1, &c, 42, 100);
        assert_eq!(t.get(1, &c, 100 + 10_799, 10_800), Some(42));
        assert_eq!(t.get(1, &c, 100 + 10_800, 10_800), None, "expired");
        assert_eq!(t.get(2, &c, 101, 10_800), None, "per service port");
        t.record(1, &c, 43, 20_000);
        assert_eq!(t.get(1, &c, 20_001, 10_800), Some(43));
    }

    #[test]
    fn a_full_set_evicts_its_least_recently_used_way() {
        let t = AffinityTable::new(4); // one set of four ways
        let clients: Vec<Addr> = (0..5).map(|i| Addr::from_v4([198, 18, 1, i])).collect();
        for (i, c) in clients.iter().enumerate().take(4) {
            t.record(1, c, i as u32, 10 + i as u32);
        }
        t.record(1, &clients[4], 4, 20);
        assert_eq!(t.get(1, &clients[0], 21, 100), None, "oldest evicted");
        for (i, c) in clients.iter().enumerate().skip(1) {
            assert_eq!(t.get(1, c, 21, 100), Some(i as u32));
        }
    }
}
