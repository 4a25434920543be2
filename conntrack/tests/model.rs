//! Property test: any sequence of operations on a small table (so that probe
//! chains collide, wrap around the end of the array and the table fills up)
//! gives the same results as a `HashMap` model of the same flows.

use proptest::prelude::*;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use xskgate_conntrack::state::{StateWord, advance};
use xskgate_conntrack::{
    Candidate, Config, Dir, FirstPacket, FlowKey, FlowState, FlowTable, InsertError, Inserted, NewFlow, Proto,
    TcpState, Timeouts, tcp_flags,
};

const CAPACITY: usize = 8;

/// A pool of 40 distinct tuples, IPv4 and IPv6, that operations pick from.
fn tuple(i: u8) -> FlowKey {
    let i = i % 40;
    let port = 1000 + u16::from(i % 5);
    if i % 4 == 3 {
        let a: Ipv6Addr = format!("2001:db8::{}", i / 5).parse().unwrap();
        FlowKey::new(Proto::TCP, a, port, Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1), 80)
    } else {
        FlowKey::new(Proto::TCP, Ipv4Addr::new(198, 18, 0, i / 5), port, Ipv4Addr::new(198, 18, 1, 1), 80)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Insert { orig: u8, reply: u8, backend: u32, syn: bool },
    Lookup(u8),
    Remove(u8),
    Touch { key: u8, now: u32, bytes: u16, flags: u8 },
    Sweep(u32),
    FlushService(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), any::<u8>(), 0u32..4, any::<bool>())
            .prop_map(|(orig, reply, backend, syn)| Op::Insert { orig, reply, backend, syn }),
        3 => any::<u8>().prop_map(Op::Lookup),
        2 => any::<u8>().prop_map(Op::Remove),
        3 => (any::<u8>(), 0u32..400, any::<u16>(), prop::sample::select(vec![0x02u8, 0x12, 0x10, 0x11, 0x04, 0x00]))
            .prop_map(|(key, now, bytes, flags)| Op::Touch { key, now, bytes, flags }),
        1 => (0u32..400).prop_map(Op::Sweep),
        1 => (0u32..4).prop_map(Op::FlushService),
    ]
}

#[derive(Clone, Debug)]
struct ModelFlow {
    orig: FlowKey,
    reply: FlowKey,
    backend: u32,
    service: u32,
    state: StateWord,
    last_seen: [u32; 2],
    packets: [u64; 2],
    bytes: [u64; 2],
}

#[derive(Default)]
struct Model {
    /// tuple -> (original tuple of its flow, direction)
    index: HashMap<FlowKey, (FlowKey, Dir)>,
    flows: HashMap<FlowKey, ModelFlow>,
}

impl Model {
    fn remove_flow(&mut self, orig: FlowKey) -> bool {
        match self.flows.remove(&orig) {
            Some(f) => {
                self.index.remove(&f.orig);
                self.index.remove(&f.reply);
                true
            }
            None => false,
        }
    }
}

/// A TCP flow that has closed (TIME_WAIT or CLOSE), whose tuples a new
/// flow may take.
fn closed(f: &ModelFlow) -> bool {
    matches!(f.state.state(), FlowState::Tcp(TcpState::TimeWait | TcpState::Close))
}

fn short_timeouts() -> Timeouts {
    Timeouts { tcp_established: 300, tcp_close_wait: 200, ..Timeouts::LINUX }
}

fn run(ops: Vec<Op>, seed: u64) -> Result<(), TestCaseError> {
    let timeouts = short_timeouts();
    let table =
        FlowTable::new(Config { capacity: CAPACITY, timeouts, early_drop: false, seed: Some(seed), accounting: true })
            .unwrap();
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Insert { orig, reply, backend, syn } => {
                let (o, r) = (tuple(orig), tuple(reply));
                let state = if syn { FlowState::Tcp(TcpState::SynSent) } else { FlowState::Tcp(TcpState::Established) };
                let flow = NewFlow { orig: o, reply: r, backend, service: backend % 3, state };
                let got = table.insert(&flow, 0);
                let want = if o == r {
                    Err(InsertError::InvalidTuple)
                } else if let Some(&(fo, dir)) = model.index.get(&o) {
                    let f = &model.flows[&fo];
                    let peer = if dir == Dir::Original { f.reply } else { f.orig };
                    Ok((true, dir, peer, f.backend))
                } else if model.flows.len() == CAPACITY {
                    // A full table says so before any SNAT retry could help.
                    Err(InsertError::Full)
                } else if model.index.get(&r).is_some_and(|&(holder, _)| !closed(&model.flows[&holder])) {
                    Err(InsertError::ReplyTaken)
                } else {
                    // A closed TCP flow holding the reply tuple gives it up.
                    if let Some(&(holder, _)) = model.index.get(&r) {
                        model.remove_flow(holder);
                    }
                    model.index.insert(o, (o, Dir::Original));
                    model.index.insert(r, (o, Dir::Reply));
                    let f = ModelFlow {
                        orig: o,
                        reply: r,
                        backend,
                        service: backend % 3,
                        state: StateWord::new(state),
                        last_seen: [0, 0],
                        packets: [0, 0],
                        bytes: [0, 0],
                    };
                    model.flows.insert(o, f);
                    Ok((false, Dir::Original, r, backend))
                };
                let got = got.map(|ins| {
                    let v = ins.view();
                    (matches!(ins, Inserted::Existing(_)), v.dir, v.peer(), v.backend)
                });
                prop_assert_eq!(got, want, "insert {:?} / {:?}", o, r);
            }
            Op::Lookup(k) => {
                let key = tuple(k);
                let got = table.lookup(&key).map(|v| (v.dir, v.peer(), v.backend, v.service, v.rewrite()));
                let want = model.index.get(&key).map(|&(fo, dir)| {
                    let f = &model.flows[&fo];
                    let peer = if dir == Dir::Original { f.reply } else { f.orig };
                    (dir, peer, f.backend, f.service, peer.reversed())
                });
                prop_assert_eq!(got, want, "lookup {:?}", key);
            }
            Op::Remove(k) => {
                let key = tuple(k);
                let want = model.index.get(&key).map(|&(fo, _)| fo);
                let want = want.is_some_and(|fo| model.remove_flow(fo));
                prop_assert_eq!(table.remove(&key), want, "remove {:?}", key);
            }
            Op::Touch { key, now, bytes, flags } => {
                let key = tuple(key);
                let got = table.lookup(&key).and_then(|v| table.touch(&v, now, u64::from(bytes), flags));
                let want = model.index.get(&key).copied().map(|(fo, dir)| {
                    let f = model.flows.get_mut(&fo).unwrap();
                    let d = (dir == Dir::Reply) as usize;
                    f.last_seen[d] = now;
                    f.packets[d] += 1;
                    f.bytes[d] += u64::from(bytes);
                    f.state = advance(f.state, dir, flags);
                    f.state.state()
                });
                prop_assert_eq!(got, want, "touch {:?}", key);
            }
            Op::Sweep(now) => {
                let expired: Vec<FlowKey> = model
                    .flows
                    .values()
                    .filter(|f| {
                        let last = f.last_seen[0].max(f.last_seen[1]);
                        now.saturating_sub(last) >= timeouts.for_state(f.state.state())
                    })
                    .map(|f| f.orig)
                    .collect();
                for o in &expired {
                    model.remove_flow(*o);
                }
                prop_assert_eq!(table.sweep_all(now), expired.len(), "sweep at {}", now);
            }
            Op::FlushService(s) => {
                let doomed: Vec<FlowKey> = model.flows.values().filter(|f| f.service == s).map(|f| f.orig).collect();
                for o in &doomed {
                    model.remove_flow(*o);
                }
                prop_assert_eq!(table.flush(|f| f.service == s), doomed.len(), "flush service {}", s);
            }
        }
        prop_assert_eq!(table.len(), model.flows.len());
        if let Err(e) = table.check_invariants() {
            return Err(TestCaseError::fail(e));
        }
    }
    // Every stored flow, with its counters and state, equals the model's.
    let mut got: Vec<_> = table
        .flows()
        .into_iter()
        .map(|f| (f.orig, f.reply, f.backend, f.service, f.state, f.last_seen, f.packets, f.bytes))
        .collect();
    let mut want: Vec<_> = model
        .flows
        .values()
        .map(|f| {
            (
                f.orig,
                f.reply,
                f.backend,
                f.service,
                f.state.state(),
                f.last_seen[0].max(f.last_seen[1]),
                f.packets,
                f.bytes,
            )
        })
        .collect();
    got.sort_by_key(|f| f.0);
    want.sort_by_key(|f| f.0);
    prop_assert_eq!(got, want);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn table_behaves_like_a_hashmap(ops in prop::collection::vec(op(), 1..120), seed in any::<u64>()) {
        run(ops, seed)?;
    }
}

/// The flow from `tuple(o)` whose replies carry `tuple(r)`.
fn flow_of(o: u8, r: u8) -> NewFlow {
    NewFlow {
        orig: tuple(o),
        reply: tuple(r),
        backend: u32::from(o),
        service: 0,
        state: FlowState::Udp { replied: false },
    }
}

/// A pinned case that exercises every error and the reply-side lookup.
#[test]
fn reply_tuple_conflicts_and_capacity() {
    let t = FlowTable::new(Config { capacity: 2, early_drop: false, seed: Some(1), ..Config::default() }).unwrap();
    assert!(matches!(t.insert(&flow_of(0, 1), 5), Ok(Inserted::New(_))));
    // Same original tuple: the existing flow, unchanged.
    let Ok(Inserted::Existing(v)) = t.insert(&flow_of(0, 2), 6) else { panic!("expected Existing") };
    assert_eq!((v.peer(), v.backend), (tuple(1), 0));
    // A new flow whose reply tuple is taken: the SNAT allocator must retry.
    assert_eq!(t.insert(&flow_of(3, 1), 6), Err(InsertError::ReplyTaken));
    assert_eq!(t.insert(&flow_of(4, 4), 6), Err(InsertError::InvalidTuple));
    assert!(matches!(t.insert(&flow_of(5, 6), 7), Ok(Inserted::New(_))));
    assert_eq!(t.insert(&flow_of(7, 8), 7), Err(InsertError::Full));
    assert_eq!(t.stats().full, 1);
    // Lookup of the reply tuple returns the reverse translation.
    let back = t.lookup(&tuple(1)).unwrap();
    assert_eq!((back.dir, back.rewrite()), (Dir::Reply, tuple(0).reversed()));
    assert!(t.remove(&tuple(1)));
    assert!(t.lookup(&tuple(0)).is_none());
    assert!(matches!(t.insert(&flow_of(7, 8), 8), Ok(Inserted::New(_))));
    t.check_invariants().unwrap();
}

/// `insert_missed` (the fast path's insert after its own lookup missed) is
/// still insert-if-absent: a stored flow comes back as `Existing`, and
/// nothing is reserved for it.
#[test]
fn insert_after_a_miss_is_still_insert_if_absent() {
    let t = FlowTable::new(Config { capacity: 2, early_drop: false, seed: Some(2), ..Config::default() }).unwrap();
    assert!(matches!(t.insert_missed(&flow_of(0, 1), 5, FirstPacket::default(), || None), Ok(Inserted::New(_))));
    let Ok(Inserted::Existing(v)) = t.insert_missed(&flow_of(0, 2), 6, FirstPacket::default(), || None) else {
        panic!("expected Existing")
    };
    assert_eq!((v.peer(), v.backend), (tuple(1), 0));
    assert_eq!(t.len(), 1);
    assert_eq!(t.insert_missed(&flow_of(3, 1), 6, FirstPacket::default(), || None), Err(InsertError::ReplyTaken));
    assert_eq!(t.insert_missed(&flow_of(4, 4), 6, FirstPacket::default(), || None), Err(InsertError::InvalidTuple));
    assert!(matches!(t.insert_missed(&flow_of(5, 6), 7, FirstPacket::default(), || None), Ok(Inserted::New(_))));
    assert_eq!(t.insert_missed(&flow_of(7, 8), 7, FirstPacket::default(), || None), Err(InsertError::Full));
    // At capacity even a stored flow is refused: the reservation comes
    // first (insert, which looks first, returns it).
    assert_eq!(t.insert_missed(&flow_of(0, 9), 7, FirstPacket::default(), || None), Err(InsertError::Full));
    assert!(matches!(t.insert(&flow_of(0, 9), 7), Ok(Inserted::Existing(_))));
    assert_eq!(t.len(), 2);
    t.check_invariants().unwrap();
}

/// A lookup that starts at `prefetch_slot`'s candidate gives the answer of
/// a plain lookup whatever the candidate: its own key's slot, another
/// key's, none, one from another (larger) table, one from before the key
/// was removed. `lookup_unless_absent` gives it too, except from `ABSENT`.
#[test]
fn a_lookup_from_any_candidate_answers_as_a_plain_lookup() {
    let t = FlowTable::new(Config { capacity: 64, seed: Some(3), ..Config::default() }).unwrap();
    let big = FlowTable::new(Config { capacity: 1 << 16, seed: Some(4), ..Config::default() }).unwrap();
    let key = |i: u16| {
        FlowKey::new(Proto::UDP, Ipv4Addr::new(198, 18, 2, (i % 200) as u8), 2000 + i, Ipv4Addr::new(198, 18, 3, 1), 53)
    };
    let flows: Vec<NewFlow> =
        (0..40u16).map(|i| NewFlow { orig: key(i), reply: key(100 + i).reversed(), ..flow_of(0, 1) }).collect();
    for f in &flows {
        assert!(matches!(t.insert(f, 1), Ok(Inserted::New(_))));
        assert!(matches!(big.insert(f, 1), Ok(Inserted::New(_))));
    }
    // Both directions of every flow, and a key that is not there.
    let keys: Vec<FlowKey> = flows.iter().flat_map(|f| [f.orig, f.reply]).chain([key(99)]).collect();
    let candidates: Vec<Candidate> = keys
        .iter()
        .flat_map(|k| [t.prefetch_slot(&t.hash(k)), big.prefetch_slot(&big.hash(k))])
        .chain([Candidate::NONE, Candidate::ABSENT])
        .collect();
    // Nearly every present key has a candidate (a chain longer than the
    // prefetch looks may have none); the absent key is known absent in the
    // sparse table, and no present key is.
    let found = candidates.iter().filter(|c| c.has_slot()).count();
    assert!(found >= 2 * (keys.len() - 1) * 9 / 10, "{found} candidates for {} keys", keys.len());
    assert_eq!(big.prefetch_slot(&big.hash(&key(99))), Candidate::ABSENT);
    for k in &keys[..keys.len() - 1] {
        assert_ne!(t.prefetch_slot(&t.hash(k)), Candidate::ABSENT, "{k:?}");
        assert_ne!(big.prefetch_slot(&big.hash(k)), Candidate::ABSENT, "{k:?}");
    }
    let check = |t: &FlowTable| {
        for k in &keys {
            let plain = t.lookup(k);
            for c in &candidates {
                assert_eq!(t.lookup_candidate(&t.hash(k), *c), plain, "{k:?} from {c:?}");
                // Taken at its word, `ABSENT` finds nothing; any other
                // candidate answers as a plain lookup.
                let unless_absent = if *c == Candidate::ABSENT { None } else { plain };
                assert_eq!(t.lookup_unless_absent(&t.hash(k), *c), unless_absent, "{k:?} from {c:?}");
            }
        }
    };
    check(&t);
    assert!(t.remove(&flows[3].orig));
    check(&t);
    assert!(t.lookup(&flows[3].orig).is_none());
}

/// `insert_missed` records the packet that missed exactly as an insert
/// followed by `touch` does (counters, last seen, a TCP state the packet's
/// flags advance): on the flow it stores, and on the flow it finds stored.
/// A failed insert records nothing.
#[test]
fn insert_after_a_miss_records_the_packet_as_touch_would() {
    let config = Config { capacity: 4, early_drop: false, seed: Some(3), accounting: true, ..Config::default() };
    let (fast, reference) = (FlowTable::new(config.clone()).unwrap(), FlowTable::new(config).unwrap());
    let tcp = |o: u8, r: u8, state: TcpState| NewFlow { state: FlowState::Tcp(state), ..flow_of(o, r) };
    let cases = [
        // A SYN starting a flow; a mid-stream FIN (picked up as established,
        // which the FIN then advances); a stored flow's next packet.
        (tcp(0, 1, TcpState::SynSent), FirstPacket { bytes: 60, tcp_flags: tcp_flags::SYN }, 10),
        (tcp(2, 3, TcpState::Established), FirstPacket { bytes: 52, tcp_flags: tcp_flags::FIN | tcp_flags::ACK }, 11),
        (tcp(0, 4, TcpState::SynSent), FirstPacket { bytes: 40, tcp_flags: tcp_flags::ACK }, 12),
    ];
    for (flow, first, now) in cases {
        let got = fast.insert_missed(&flow, now, first, || None).unwrap();
        let want = reference.insert(&flow, now).unwrap();
        let (Inserted::New(v) | Inserted::Existing(v)) = want;
        reference.touch(&v, now, first.bytes, first.tcp_flags).unwrap();
        assert_eq!(matches!(got, Inserted::New(_)), matches!(want, Inserted::New(_)));
    }
    let sorted = |t: &FlowTable| {
        let mut flows = t.flows();
        flows.sort_by_key(|f| f.backend);
        flows
    };
    let got = sorted(&fast);
    assert_eq!(got, sorted(&reference));
    assert_eq!(got.len(), 2);
    assert_eq!((got[0].packets, got[0].bytes, got[0].last_seen), ([2, 0], [100, 0], 12));
    assert_ne!(got[1].state, FlowState::Tcp(TcpState::Established), "the FIN advanced the state");
    // The reply tuple is taken: nothing stored, nothing recorded.
    let taken = fast.insert_missed(&tcp(5, 1, TcpState::SynSent), 13, FirstPacket { bytes: 9, tcp_flags: 0 }, || None);
    assert_eq!(taken, Err(InsertError::ReplyTaken));
    assert_eq!(sorted(&fast), got);
    fast.check_invariants().unwrap();
}

/// Without accounting (the default) packets and bytes stay 0, and
/// everything else a packet records is kept: last seen and the TCP state,
/// from the first packet and from later ones.
#[test]
fn without_accounting_counters_stay_zero_and_the_rest_is_recorded() {
    let t = FlowTable::new(Config { capacity: 4, seed: Some(5), ..Config::default() }).unwrap();
    assert!(!t.config().accounting, "off by default, as nf_conntrack_acct");
    let flow = NewFlow { state: FlowState::Tcp(TcpState::SynSent), ..flow_of(0, 1) };
    let Ok(Inserted::New(v)) = t.insert_missed(&flow, 7, FirstPacket { bytes: 60, tcp_flags: tcp_flags::SYN }, || None)
    else {
        panic!("a new flow");
    };
    let reply = t.lookup(&v.peer()).unwrap();
    assert_eq!(t.touch(&reply, 9, 60, tcp_flags::SYN | tcp_flags::ACK), Some(FlowState::Tcp(TcpState::SynRecv)));
    let f = &t.flows()[0];
    assert_eq!((f.packets, f.bytes), ([0, 0], [0, 0]));
    assert_eq!((f.last_seen, f.state), (9, FlowState::Tcp(TcpState::SynRecv)));
    t.check_invariants().unwrap();
}

/// When the reply tuple is taken, `insert_missed` moves the reply's
/// destination port to the next one the caller's search yields, keeping
/// the original tuple claimed meanwhile: it stores the first free one,
/// skips one whose reply tuple would be the original tuple, and reports
/// `ReplyTaken` with nothing stored when the search ends.
#[test]
fn insert_after_a_miss_moves_a_taken_reply_port() {
    let t = FlowTable::new(Config { capacity: 8, early_drop: false, seed: Some(4), ..Config::default() }).unwrap();
    let with_port = |k: FlowKey, dport: u16| FlowKey { dport, ..k };
    let flow = |orig: FlowKey, reply: FlowKey, backend: u32| NewFlow { orig, reply, backend, ..flow_of(0, 1) };
    let first = FirstPacket { bytes: 40, tcp_flags: 0 };
    let taken = tuple(1);
    assert!(matches!(t.insert_missed(&flow(tuple(0), taken, 0), 1, first, || None), Ok(Inserted::New(_))));
    assert!(matches!(
        t.insert_missed(&flow(tuple(2), with_port(taken, 81), 2), 1, first, || None),
        Ok(Inserted::New(_))
    ));
    // Ports 80 and 81 are taken: the flow is stored with 82.
    let mut ports = [81, 82, 83].into_iter();
    let Ok(Inserted::New(v)) = t.insert_missed(&flow(tuple(3), taken, 3), 2, first, || ports.next()) else {
        panic!("expected New")
    };
    assert_eq!((v.peer(), ports.next()), (with_port(taken, 82), Some(83)));
    let back = t.lookup(&with_port(taken, 82)).unwrap();
    assert_eq!((back.dir, back.backend, back.rewrite()), (Dir::Reply, 3, tuple(3).reversed()));
    // The search ends before a free port: nothing stored, nothing held.
    let mut ports = [81, 82].into_iter();
    assert_eq!(t.insert_missed(&flow(tuple(6), taken, 6), 3, first, || ports.next()), Err(InsertError::ReplyTaken));
    assert!(t.lookup(&tuple(6)).is_none());
    assert_eq!(t.len(), 3);
    // Port 83 would make the reply tuple the original one: skipped.
    let orig = with_port(taken, 83);
    let mut ports = [83, 84].into_iter();
    let Ok(Inserted::New(v)) = t.insert_missed(&flow(orig, taken, 8), 4, first, || ports.next()) else {
        panic!("expected New")
    };
    assert_eq!(v.peer(), with_port(taken, 84));
    assert_eq!(t.len(), 4);
    t.check_invariants().unwrap();
}

/// A SNAT port whose TCP flow has closed is reusable at once, as Linux's
/// NAT reuses it: a new flow that needs the reply tuple of a flow in
/// TIME_WAIT (FIN both ways) or CLOSE (a reset) removes that flow and takes
/// the tuple; a flow that is still open (established, or half closed)
/// keeps it and the search moves on. Each reuse is counted.
#[test]
fn a_closed_tcp_flow_gives_up_its_reply_tuple_an_open_one_keeps_it() {
    use tcp_flags::{ACK, FIN, RST, SYN};
    let t = FlowTable::new(Config { capacity: 8, early_drop: false, seed: Some(9), ..Config::default() }).unwrap();
    let syn = FirstPacket { bytes: 60, tcp_flags: SYN };
    let tcp = |o: u8, r: u8| NewFlow { state: FlowState::Tcp(TcpState::SynSent), ..flow_of(o, r) };
    let open = |o: u8, r: u8| {
        let Ok(Inserted::New(v)) = t.insert_missed(&tcp(o, r), 1, syn, || None) else { panic!("a new flow {o}") };
        let back = t.lookup(&v.peer()).unwrap();
        t.touch(&back, 1, 60, SYN | ACK).unwrap();
        assert_eq!(t.touch(&v, 1, 40, ACK), Some(FlowState::Tcp(TcpState::Established)));
        (v, back)
    };
    // Flow 0 closes with FIN both ways, flow 2 with a reset, flow 4 only
    // half (FIN from the client), flow 6 stays established.
    let (v, back) = open(0, 1);
    t.touch(&v, 2, 40, FIN | ACK).unwrap();
    t.touch(&back, 2, 40, FIN | ACK).unwrap();
    assert_eq!(t.touch(&v, 2, 40, ACK), Some(FlowState::Tcp(TcpState::TimeWait)));
    let (_, back) = open(2, 3);
    assert_eq!(t.touch(&back, 2, 40, RST), Some(FlowState::Tcp(TcpState::Close)));
    let (v, _) = open(4, 5);
    assert_eq!(t.touch(&v, 2, 40, FIN | ACK), Some(FlowState::Tcp(TcpState::FinWait)));
    open(6, 7);
    assert_eq!(t.len(), 4);

    // New flows that want each one's reply tuple, with no other port to try.
    for (o, r, reused) in [(10, 1, true), (11, 3, true), (12, 5, false), (13, 7, false)] {
        let got = t.insert_missed(&tcp(o, r), 3, syn, || None);
        if reused {
            let Ok(Inserted::New(v)) = got else { panic!("flow {o} takes the closed flow's tuple: {got:?}") };
            assert_eq!(v.peer(), tuple(r));
            assert_eq!(t.lookup(&tuple(r)).map(|b| b.peer()), Some(tuple(o)), "the tuple is the new flow's");
            assert!(t.lookup(&tuple(r - 1)).is_none(), "the closed flow is gone, both directions");
        } else {
            assert_eq!(got, Err(InsertError::ReplyTaken), "flow {o}: the open flow keeps its tuple");
            assert_eq!(t.lookup(&tuple(r)).map(|b| b.peer()), Some(tuple(r - 1)));
        }
    }
    assert_eq!(t.stats().closed_reused, 2);
    assert_eq!(t.len(), 4, "two closed flows out, two new ones in");

    // The search goes on past an open flow's tuple (flow 6's, port 80) to
    // the next port's, which a reset flow holds.
    let port_81 = FlowKey { dport: 81, ..tuple(7) };
    let Ok(Inserted::New(v)) = t.insert_missed(&NewFlow { reply: port_81, ..tcp(20, 0) }, 4, syn, || None) else {
        panic!("a new flow")
    };
    let back = t.lookup(&v.peer()).unwrap();
    assert_eq!(t.touch(&back, 4, 40, RST), Some(FlowState::Tcp(TcpState::Close)));
    let mut ports = [81].into_iter();
    let Ok(Inserted::New(v)) = t.insert_missed(&tcp(22, 7), 5, syn, || ports.next()) else { panic!("a new flow") };
    assert_eq!(v.peer(), port_81, "moved past the open flow to the closed flow's port");
    assert!(t.lookup(&tuple(20)).is_none());
    assert_eq!(t.stats().closed_reused, 3);
    t.check_invariants().unwrap();
}
