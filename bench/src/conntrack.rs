//! `xskgate-bench conntrack`: the flow table against well-kept concurrent
//! maps (papaya, scc, dashmap) on the same workload, in one run.
//!
//! Workload: N flows, each stored under both of its tuples (original and
//! reply), as the fast path needs. Every map gets the same data per
//! direction (peer tuple, backend, service, direction, state, last seen,
//! counters), a fast hasher (foldhash), its capacity reserved up front, and
//! keys already packed as `[u64; 5]`. Lookups go to random tuples in an order
//! fixed before timing; misses go to tuples that are not stored. "Per core"
//! figures divide the two-thread throughput by two.
//!
//! The machine is shared and noisy, so the four tables are built and kept
//! side by side, every lookup figure is measured in several rounds that
//! alternate between the tables, and the median round is reported; inserts
//! alternate the same way, each round into fresh tables.
//!
//! `bytes_per_entry` is the growth of the resident set while N flows are
//! inserted, divided by N: bytes per flow, both directions included.

use crate::report::{Args, Rng, median, mops, progress, r3, rss_bytes};
use serde_json::{Map, Value, json};
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::Instant;
use xskgate_conntrack::{Candidate, Config, Dir, FlowKey, FlowState, FlowTable, Inserted, NewFlow, Proto};
use xskgate_tests::alloc::allocations;

type Words = [u64; 5];
type Hasher = foldhash::fast::RandomState;

/// What a competitor map stores per direction: the same data our slot holds.
struct DirEntry {
    peer: Words,
    backend: u32,
    service: u32,
    dir: Dir,
    #[allow(dead_code)]
    state: AtomicU32,
    #[allow(dead_code)]
    last_seen: AtomicU32,
    #[allow(dead_code)]
    packets: AtomicU64,
    #[allow(dead_code)]
    bytes: AtomicU64,
}

impl DirEntry {
    fn new(peer: Words, f: &NewFlow, dir: Dir) -> DirEntry {
        DirEntry {
            peer,
            backend: f.backend,
            service: f.service,
            dir,
            state: AtomicU32::new(0),
            last_seen: AtomicU32::new(0),
            packets: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }
    /// What a lookup hands back to the caller, folded into one number.
    fn digest(&self) -> u64 {
        self.peer[1]
            ^ self.peer[4]
            ^ u64::from(self.backend)
            ^ u64::from(self.service)
            ^ (self.dir == Dir::Reply) as u64
    }
}

/// The operations every table under test offers. The measuring loops are
/// provided methods, so each is compiled for each table (no dynamic call per
/// operation) while the rounds hold the tables as trait objects.
trait Table: Sync {
    fn name(&self) -> &'static str;
    /// Inserts both directions if absent; true if the flow is new.
    fn insert_flow(&self, f: &NewFlow) -> bool;
    /// Looks a tuple up and returns a digest of what was found.
    fn lookup(&self, k: &FlowKey) -> Option<u64>;
    /// Batched lookups, where the table can do better than one at a time.
    fn lookup_batch(&self, keys: &[FlowKey]) -> (usize, u64) {
        let mut hits = 0;
        let mut acc = 0;
        for k in keys {
            if let Some(d) = self.lookup(k) {
                hits += 1;
                acc ^= d;
            }
        }
        (hits, acc)
    }

    /// Mops of one thread looking up `keys` in order; checks every answer.
    fn timed_lookups(&self, keys: &[FlowKey], expect_hits: bool) -> f64 {
        let start = Instant::now();
        let mut hits = 0usize;
        let mut acc = 0u64;
        for k in keys {
            if let Some(d) = self.lookup(black_box(k)) {
                hits += 1;
                acc ^= d;
            }
        }
        let r = mops(keys.len(), start);
        black_box(acc);
        assert_eq!(hits, if expect_hits { keys.len() } else { 0 }, "{}: wrong lookup results", self.name());
        r
    }

    /// Mops of inserting `flows` (every `step`-th from `first`).
    fn timed_inserts(&self, flows: &[NewFlow], first: usize, step: usize) -> f64 {
        let start = Instant::now();
        let mut n = 0;
        for f in flows.iter().skip(first).step_by(step) {
            assert!(self.insert_flow(f), "{}: insert refused", self.name());
            n += 1;
        }
        mops(n, start)
    }
}

type Constructor = fn(usize) -> Box<dyn Table>;

const TABLES: [(&str, Constructor); 4] = [
    ("xskgate", |n| Box::new(Xskgate::with_capacity(n))),
    ("papaya", |n| Box::new(Papaya::with_capacity(n))),
    ("scc", |n| Box::new(Scc::with_capacity(n))),
    ("dashmap", |n| Box::new(Dash::with_capacity(n))),
];

struct Xskgate(FlowTable);

impl Xskgate {
    fn with_capacity(flows: usize) -> Self {
        Xskgate(FlowTable::new(Config { capacity: flows, ..Config::default() }).expect("conntrack table"))
    }
}

impl Table for Xskgate {
    fn name(&self) -> &'static str {
        "xskgate"
    }
    fn insert_flow(&self, f: &NewFlow) -> bool {
        matches!(self.0.insert(f, 0), Ok(Inserted::New(_)))
    }
    #[inline]
    fn lookup(&self, k: &FlowKey) -> Option<u64> {
        self.0.lookup(k).map(|v| {
            v.rewrite_dst().0[15] as u64 ^ u64::from(v.rewrite_ports()[3]) ^ u64::from(v.backend) ^ u64::from(v.service)
        })
    }
    fn lookup_batch(&self, keys: &[FlowKey]) -> (usize, u64) {
        const BATCH: usize = 64;
        let mut hits = 0;
        let mut acc = 0;
        let mut hashes = [self.0.hash(&keys[0]); BATCH];
        let mut candidates = [Candidate::NONE; BATCH];
        for chunk in keys.chunks(BATCH) {
            for (h, k) in hashes.iter_mut().zip(chunk) {
                *h = self.0.hash(k);
                self.0.prefetch(h);
            }
            for (c, h) in candidates.iter_mut().zip(&hashes[..chunk.len()]) {
                *c = self.0.prefetch_slot(h);
            }
            for (h, c) in hashes[..chunk.len()].iter().zip(&candidates) {
                if let Some(v) = self.0.lookup_candidate(h, *c) {
                    hits += 1;
                    acc ^= v.rewrite_dst().0[15] as u64 ^ u64::from(v.rewrite_ports()[3]) ^ u64::from(v.backend);
                }
            }
        }
        (hits, acc)
    }
}

struct Papaya(papaya::HashMap<Words, DirEntry, Hasher>);

impl Papaya {
    fn with_capacity(flows: usize) -> Self {
        Papaya(papaya::HashMap::with_capacity_and_hasher(2 * flows, Hasher::default()))
    }
}

impl Table for Papaya {
    fn name(&self) -> &'static str {
        "papaya"
    }
    fn insert_flow(&self, f: &NewFlow) -> bool {
        let (o, r) = (f.orig.to_words(), f.reply.to_words());
        let m = self.0.pin();
        if m.try_insert(o, DirEntry::new(r, f, Dir::Original)).is_err() {
            return false;
        }
        m.try_insert(r, DirEntry::new(o, f, Dir::Reply)).is_ok()
    }
    #[inline]
    fn lookup(&self, k: &FlowKey) -> Option<u64> {
        self.0.pin().get(&k.to_words()).map(DirEntry::digest)
    }
}

struct Scc(scc::HashMap<Words, DirEntry, Hasher>);

impl Scc {
    fn with_capacity(flows: usize) -> Self {
        Scc(scc::HashMap::with_capacity_and_hasher(2 * flows, Hasher::default()))
    }
}

impl Table for Scc {
    fn name(&self) -> &'static str {
        "scc"
    }
    fn insert_flow(&self, f: &NewFlow) -> bool {
        let (o, r) = (f.orig.to_words(), f.reply.to_words());
        self.0.insert_sync(o, DirEntry::new(r, f, Dir::Original)).is_ok()
            && self.0.insert_sync(r, DirEntry::new(o, f, Dir::Reply)).is_ok()
    }
    #[inline]
    fn lookup(&self, k: &FlowKey) -> Option<u64> {
        self.0.read_sync(&k.to_words(), |_, v| v.digest())
    }
}

struct Dash(dashmap::DashMap<Words, DirEntry, Hasher>);

impl Dash {
    fn with_capacity(flows: usize) -> Self {
        Dash(dashmap::DashMap::with_capacity_and_hasher(2 * flows, Hasher::default()))
    }
}

impl Table for Dash {
    fn name(&self) -> &'static str {
        "dashmap"
    }
    fn insert_flow(&self, f: &NewFlow) -> bool {
        use dashmap::mapref::entry::Entry;
        let (o, r) = (f.orig.to_words(), f.reply.to_words());
        let new_o = match self.0.entry(o) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(DirEntry::new(r, f, Dir::Original));
                true
            }
        };
        new_o
            && match self.0.entry(r) {
                Entry::Occupied(_) => false,
                Entry::Vacant(v) => {
                    v.insert(DirEntry::new(o, f, Dir::Reply));
                    true
                }
            }
    }
    #[inline]
    fn lookup(&self, k: &FlowKey) -> Option<u64> {
        self.0.get(&k.to_words()).map(|e| e.digest())
    }
}

/// The flows and the lookup sequences, built once and shared by all tables.
struct Workload {
    flows: Vec<NewFlow>,
    hits: Vec<FlowKey>,
    misses: Vec<FlowKey>,
}

fn flow(i: usize) -> NewFlow {
    // Unique original tuples: 200 clients × 50,000 ports; unique reply
    // tuples: (endpoint, SNAT port) pairs. All in 198.18.0.0/15.
    let client = 0xC612_0000u32 + (i / 50_000) as u32;
    let cport = 10_000 + (i % 50_000) as u16;
    let pod = 0xC613_0000u32 + (i / 60_000) as u32;
    let snat_port = 1024 + (i % 60_000) as u16;
    let orig = FlowKey::new(Proto::TCP, Ipv4Addr::from(client), cport, Ipv4Addr::new(198, 19, 255, 1), 80);
    let reply = FlowKey::new(Proto::TCP, Ipv4Addr::from(pod), 8080, Ipv4Addr::new(198, 18, 255, 254), snat_port);
    NewFlow {
        orig,
        reply,
        backend: (i % 100) as u32,
        service: 1,
        state: FlowState::Tcp(xskgate_conntrack::TcpState::Established),
    }
}

impl Workload {
    fn new(n: usize, lookups: usize) -> Workload {
        let flows: Vec<NewFlow> = (0..n).map(flow).collect();
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let hits = (0..lookups)
            .map(|_| {
                let f = &flows[rng.below(n)];
                if rng.below(2) == 0 { f.orig } else { f.reply }
            })
            .collect();
        let misses = (0..lookups)
            .map(|_| {
                let mut k = flows[rng.below(n)].orig;
                k.dport = 81; // no flow goes to port 81
                k
            })
            .collect();
        Workload { flows, hits, misses }
    }
}

/// Figures for one table at one size.
#[derive(Default)]
struct Figures {
    insert_mops: f64,
    insert_2t_mops_per_core: f64,
    lookup_mops: f64,
    lookup_miss_mops: f64,
    lookup_2t_mops_per_core: f64,
    lookup_miss_2t_mops_per_core: f64,
    lookup_batch_mops: f64,
    bytes_per_entry: f64,
    allocs_per_insert: f64,
    allocs_per_lookup: f64,
}

/// Aggregate Mops of two threads each doing its half, divided by two.
fn per_core_2t(t: &dyn Table, keys: &[FlowKey], expect_hits: bool) -> f64 {
    let (a, b) = keys.split_at(keys.len() / 2);
    let start = Instant::now();
    std::thread::scope(|s| {
        let ha = s.spawn(|| t.timed_lookups(a, expect_hits));
        t.timed_lookups(b, expect_hits);
        ha.join().expect("lookup thread");
    });
    mops(keys.len(), start) / 2.0
}

/// All figures for all tables at one size, alternating tables in every round.
fn measure_size(w: &Workload, rounds: usize) -> Vec<(&'static str, Figures)> {
    let n = w.flows.len();
    let mut insert_samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); TABLES.len()];
    let mut lookup_samples: Vec<Vec<[f64; 5]>> = vec![Vec::new(); TABLES.len()];
    let mut figs: Vec<Figures> = TABLES.iter().map(|_| Figures::default()).collect();

    // Build all tables side by side (memory and allocations measured here).
    let mut tables = Vec::new();
    for (k, (name, make)) in TABLES.iter().enumerate() {
        progress(&format!("{n} flows: building {name} for the lookup rounds"));
        let rss0 = rss_bytes();
        let t = make(n);
        let allocs0 = allocations();
        t.timed_inserts(&w.flows, 0, 1);
        figs[k].allocs_per_insert = (allocations() - allocs0) as f64 / n as f64;
        figs[k].bytes_per_entry = rss_bytes().saturating_sub(rss0) as f64 / n as f64;
        tables.push(t);
    }
    for round in 0..rounds {
        progress(&format!("{n} flows: lookup round {}/{rounds}", round + 1));
        for (k, t) in tables.iter().enumerate() {
            let allocs0 = allocations();
            let hit = t.timed_lookups(&w.hits, true);
            figs[k].allocs_per_lookup = (allocations() - allocs0) as f64 / w.hits.len() as f64;
            let miss = t.timed_lookups(&w.misses, false);
            let hit2 = per_core_2t(&**t, &w.hits, true);
            let miss2 = per_core_2t(&**t, &w.misses, false);
            let start = Instant::now();
            let (hits, acc) = t.lookup_batch(&w.hits);
            let batch = mops(w.hits.len(), start);
            black_box(acc);
            assert_eq!(hits, w.hits.len());
            lookup_samples[k].push([hit, miss, hit2, miss2, batch]);
        }
    }
    for (k, s) in lookup_samples.iter().enumerate() {
        let col = |c: usize| median(s.iter().map(|x| x[c]).collect());
        figs[k].lookup_mops = col(0);
        figs[k].lookup_miss_mops = col(1);
        figs[k].lookup_2t_mops_per_core = col(2);
        figs[k].lookup_miss_2t_mops_per_core = col(3);
        figs[k].lookup_batch_mops = col(4);
    }
    drop(tables);

    // Inserts, each round into fresh tables: one thread, then two.
    for round in 0..rounds {
        for (k, (name, make)) in TABLES.iter().enumerate() {
            progress(&format!("{n} flows, insert round {}/{rounds}: {name}", round + 1));
            let t = make(n);
            let one = t.timed_inserts(&w.flows, 0, 1);
            drop(t);
            let t = make(n);
            let start = Instant::now();
            std::thread::scope(|s| {
                let t = &*t;
                s.spawn(move || t.timed_inserts(&w.flows, 1, 2));
                t.timed_inserts(&w.flows, 0, 2);
            });
            let two = mops(n, start) / 2.0;
            insert_samples[k].push((one, two));
        }
    }
    for (k, s) in insert_samples.iter().enumerate() {
        figs[k].insert_mops = median(s.iter().map(|x| x.0).collect());
        figs[k].insert_2t_mops_per_core = median(s.iter().map(|x| x.1).collect());
    }

    TABLES.iter().map(|(name, _)| *name).zip(figs).collect()
}

fn figures_json(f: &Figures, with_batch: bool) -> Value {
    let mut v = json!({
        "lookup_mops": r3(f.lookup_mops),
        "insert_mops": r3(f.insert_mops),
        "bytes_per_entry": f.bytes_per_entry.round(),
        "lookup_miss_mops": r3(f.lookup_miss_mops),
        "lookup_2t_mops_per_core": r3(f.lookup_2t_mops_per_core),
        "lookup_miss_2t_mops_per_core": r3(f.lookup_miss_2t_mops_per_core),
        "insert_2t_mops_per_core": r3(f.insert_2t_mops_per_core),
        "allocs_per_lookup": r3(f.allocs_per_lookup),
        "allocs_per_insert": r3(f.allocs_per_insert),
    });
    if with_batch {
        v["lookup_batch_mops"] = json!(r3(f.lookup_batch_mops));
    }
    v
}

pub fn run(args: &Args) -> Result<(), String> {
    let sizes: &[usize] = if args.quick { &[1 << 20] } else { &[1 << 20, 10 << 20] };
    let lookups = if args.quick { 2_000_000 } else { 4_000_000 };
    let rounds = if args.quick { 3 } else { 5 };
    let mut results: Vec<(usize, Vec<(&str, Figures)>)> = Vec::new();
    for &n in sizes {
        progress(&format!("building the workload: {n} flows, {lookups} lookups"));
        let w = Workload::new(n, lookups);
        results.push((n, measure_size(&w, rounds)));
    }

    if args.json {
        let mut out = Map::new();
        let (_, first) = &results[0];
        for (name, f) in first {
            let mut v = figures_json(f, *name == "xskgate");
            for (n, figs) in &results[1..] {
                let (_, f10) = figs.iter().find(|(m, _)| m == name).expect("same tables at every size");
                v[format!("at_{}m", n >> 20)] = figures_json(f10, *name == "xskgate");
            }
            out.insert((*name).to_string(), v);
        }
        println!("{}", Value::Object(out));
        return Ok(());
    }

    println!("## conntrack: lookups and inserts, Mops (higher is better)\n");
    println!(
        "| flows | table | lookup hit 1t | lookup miss 1t | hit 2t/core | miss 2t/core | insert 1t | insert 2t/core | bytes/flow | allocs/lookup | allocs/insert |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (n, figs) in &results {
        for (name, f) in figs {
            println!(
                "| {}M | {name} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.0} | {:.2} | {:.2} |",
                n >> 20,
                f.lookup_mops,
                f.lookup_miss_mops,
                f.lookup_2t_mops_per_core,
                f.lookup_miss_2t_mops_per_core,
                f.insert_mops,
                f.insert_2t_mops_per_core,
                f.bytes_per_entry,
                f.allocs_per_lookup,
                f.allocs_per_insert,
            );
        }
    }
    println!();
    for (n, figs) in &results {
        let ours = &figs[0].1;
        let best = |get: fn(&Figures) -> f64| {
            figs[1..].iter().map(|(m, f)| (*m, get(f))).fold(("none", 0.0), |a, b| if b.1 > a.1 { b } else { a })
        };
        let (bl, bl_v) = best(|f| f.lookup_mops);
        let (bm, bm_v) = best(|f| f.lookup_miss_mops);
        let (bi, bi_v) = best(|f| f.insert_mops);
        println!(
            "{}M flows: xskgate lookups {:.2}x the best other ({bl}), misses {:.2}x ({bm}), inserts {:.2}x ({bi}); batched lookups with prefetch {:.2} Mops",
            n >> 20,
            ours.lookup_mops / bl_v,
            ours.lookup_miss_mops / bm_v,
            ours.insert_mops / bi_v,
            ours.lookup_batch_mops,
        );
    }
    Ok(())
}
