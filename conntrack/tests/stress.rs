//! Concurrent stress: more threads than cores insert, look up, touch, remove,
//! sweep and flush overlapping flows, bounded in time and operations.
//!
//! Invariants checked:
//! - no torn value: every lookup returns the peer, backend and service that
//!   belong to the key it was asked for (values are derived from the key);
//! - insert-if-absent: for every flow, successful inserts minus successful
//!   removals is 0 or 1 at the end and equals its presence (no lost entry, no
//!   duplicate flow);
//! - the quiescent table passes `check_invariants` (no key stored twice,
//!   overflow counts exact, both halves of every flow linked).
//!
//! A fifth of the flows are IPv6 and a fifth go from an IPv4 client to an
//! IPv6 endpoint, so slots are re-used between the compact (IPv4) and the
//! wide layout while readers read them.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use xskgate_conntrack::{Config, Dir, FlowKey, FlowState, FlowTable, InsertError, Inserted, NewFlow, Proto};

const FLOWS: u32 = 3000;
const THREADS: usize = 4;
const RUN_FOR: Duration = Duration::from_millis(2500);
const MAX_OPS_PER_THREAD: u64 = 3_000_000;

/// Flow `i`: IPv4, IPv6, or an IPv4 client reaching an IPv6 endpoint
/// (whose reply goes to an IPv6 address that stands for the client). The
/// address that names the client ends in the two bytes of `i`.
fn flow(i: u32) -> NewFlow {
    let [_, _, a, b] = i.to_be_bytes();
    let port = 40000 + (i % 7) as u16;
    let endpoint = (i % 3) as u16 + 1;
    let (orig, reply) = match i % 5 {
        0 => {
            let client = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16);
            let vip = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
            let pod = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, endpoint);
            (FlowKey::new(Proto::TCP, client, port, vip, 80), FlowKey::new(Proto::TCP, pod, 8080, client, port))
        }
        1 => {
            let client = Ipv4Addr::new(198, 18, a, b);
            let stand_in = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, i as u16);
            let pod = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, endpoint);
            let vip = Ipv4Addr::new(198, 19, 255, 1);
            (FlowKey::new(Proto::TCP, client, port, vip, 80), FlowKey::new(Proto::TCP, pod, 8080, stand_in, port))
        }
        _ => {
            let client = Ipv4Addr::new(198, 18, a, b);
            let vip = Ipv4Addr::new(198, 19, 255, 1);
            let pod = Ipv4Addr::new(198, 19, 0, endpoint as u8);
            (FlowKey::new(Proto::TCP, client, port, vip, 80), FlowKey::new(Proto::TCP, pod, 8080, client, port))
        }
    };
    NewFlow { orig, reply, backend: i, service: i % 11, state: FlowState::Udp { replied: false } }
}

/// Which flow a key belongs to, recovered from the key alone.
fn index_of(k: &FlowKey) -> u32 {
    let client = if k.dport == 80 { k.src } else { k.dst };
    u32::from(u16::from_be_bytes([client.0[14], client.0[15]]))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn concurrent_ops_keep_every_invariant() {
    // Capacity below the flow count so that Full is part of the mix.
    let table = Arc::new(FlowTable::new(Config { capacity: 1200, early_drop: false, ..Config::default() }).unwrap());
    let ledger: Arc<Vec<AtomicI64>> = Arc::new((0..FLOWS).map(|_| AtomicI64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<[AtomicU64; 6]> = Arc::new(Default::default());
    let deadline = Instant::now() + RUN_FOR;
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (table, ledger, stop, outcomes) = (table.clone(), ledger.clone(), stop.clone(), outcomes.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9 + t as u64 * 7919);
            let mut ops = 0u64;
            while ops < MAX_OPS_PER_THREAD && !stop.load(Ordering::Relaxed) {
                ops += 1;
                if ops.is_multiple_of(1024) && Instant::now() > deadline {
                    break;
                }
                // Hot keys: half of the operations go to 64 flows, so that
                // threads really race on the same keys.
                let r = rng.next();
                let i = if r & 1 == 0 { (r >> 8) as u32 % 64 } else { (r >> 8) as u32 % FLOWS };
                let f = flow(i);
                match (r >> 40) % 10 {
                    0..=2 => match table.insert(&f, (ops / 1000) as u32) {
                        Ok(Inserted::New(v)) => {
                            ledger[i as usize].fetch_add(1, Ordering::SeqCst);
                            assert_eq!((v.backend, v.peer()), (i, f.reply));
                            outcomes[0].fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Inserted::Existing(v)) => {
                            assert_eq!((v.dir, v.backend, v.peer()), (Dir::Original, i, f.reply), "torn Existing");
                            outcomes[1].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(InsertError::Full) => {
                            outcomes[2].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(InsertError::Contended) => {
                            outcomes[3].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("unexpected insert error {e:?} for flow {i}"),
                    },
                    3..=6 => {
                        let key = if r & (1 << 50) == 0 { f.orig } else { f.reply };
                        if let Some(v) = table.lookup(&key) {
                            let want_peer = if v.dir == Dir::Original { f.reply } else { f.orig };
                            assert_eq!(index_of(&key), i);
                            assert_eq!(
                                (v.backend, v.service, v.peer()),
                                (i, i % 11, want_peer),
                                "torn lookup of {key:?}"
                            );
                            assert_eq!(v.dir == Dir::Original, key == f.orig);
                            table.touch(&v, (ops / 1000) as u32, 64, 0);
                            outcomes[4].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    7..=8 => {
                        let key = if r & (1 << 51) == 0 { f.orig } else { f.reply };
                        if table.remove(&key) {
                            ledger[i as usize].fetch_sub(1, Ordering::SeqCst);
                            outcomes[5].fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    _ => {
                        // Readers of the whole table: a sweep that expires
                        // nothing (now = 0) and a flush that keeps everything.
                        let mut cursor = (r >> 20) as usize;
                        assert_eq!(table.sweep(0, &mut cursor, 256), 0);
                        if r.is_multiple_of(97) {
                            assert_eq!(
                                table.flush(|info| {
                                    assert_eq!(info.backend, index_of(&info.orig), "torn flow info");
                                    false
                                }),
                                0
                            );
                        }
                    }
                }
            }
            ops
        }));
    }
    let total_ops: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
    stop.store(true, Ordering::Relaxed);
    let o: Vec<u64> = outcomes.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    eprintln!(
        "{total_ops} ops: new {} existing {} full {} contended {} lookups-hit {} removed {}",
        o[0], o[1], o[2], o[3], o[4], o[5]
    );
    assert!(
        o[0] > 1000 && o[1] > 100 && o[2] > 0 && o[4] > 1000 && o[5] > 100,
        "too little contention to prove anything: {o:?}"
    );

    table.check_invariants().unwrap();
    let mut present = 0;
    for i in 0..FLOWS {
        let l = ledger[i as usize].load(Ordering::SeqCst);
        let f = flow(i);
        let here = table.lookup(&f.orig).is_some();
        assert_eq!(here, table.lookup(&f.reply).is_some(), "flow {i}: one half only");
        assert!(l == 0 || l == 1, "flow {i}: inserted {l} times more than removed (duplicate)");
        assert_eq!(here, l == 1, "flow {i}: ledger {l} but present = {here} (lost or phantom entry)");
        present += usize::from(here);
    }
    assert_eq!(table.len(), present);
}

#[test]
fn concurrent_expiry_accounts_for_every_flow() {
    let table = Arc::new(FlowTable::new(Config { capacity: 20_000, ..Config::default() }).unwrap());
    let inserted = Arc::new(AtomicU64::new(0));
    let expired = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sweeper = {
        let (table, expired, done) = (table.clone(), expired.clone(), done.clone());
        std::thread::spawn(move || {
            let mut cursor = 0;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !done.load(Ordering::Acquire) && Instant::now() < deadline {
                // UDP unreplied lives 30 s; flows are inserted at t = 0..100.
                let n = table.sweep(1_000, &mut cursor, 512);
                expired.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    let writers: Vec<_> = (0..2u32)
        .map(|w| {
            let (table, inserted) = (table.clone(), inserted.clone());
            std::thread::spawn(move || {
                for i in (w..FLOWS).step_by(2) {
                    if let Ok(Inserted::New(v)) = table.insert(&flow(i), i % 100) {
                        inserted.fetch_add(1, Ordering::Relaxed);
                        let _ = table.lookup(&flow(i).reply).map(|r| table.touch(&r, i % 100, 1, 0));
                        let _ = v;
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Release);
    sweeper.join().unwrap();
    let last = table.sweep_all(1_000) as u64;
    let (ins, exp) = (inserted.load(Ordering::Relaxed), expired.load(Ordering::Relaxed) + last);
    assert_eq!(ins, u64::from(FLOWS));
    assert_eq!(exp, ins, "every flow expires exactly once");
    assert!(table.is_empty());
    table.check_invariants().unwrap();
}
