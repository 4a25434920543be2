//! A full table refuses new flows cleanly (counted `conntrack_full`) and keeps
//! every flow it had; early drop evicts only not-yet-assured flows.

use std::net::Ipv4Addr;
use xskgate_conntrack::{
    Config, Dir, FlowKey, FlowState, FlowTable, InsertError, Inserted, NewFlow, Proto, TableError, TcpState, tcp_flags,
};

fn flow(i: u32, state: FlowState) -> NewFlow {
    let [_, _, a, b] = i.to_be_bytes();
    let client = Ipv4Addr::new(198, 18, a, b);
    let orig = FlowKey::new(Proto::UDP, client, 5000, Ipv4Addr::new(198, 19, 255, 1), 53);
    let reply = FlowKey::new(Proto::UDP, Ipv4Addr::new(198, 19, 0, 2), 5353, client, 5000);
    NewFlow { orig, reply, backend: i, service: 1, state }
}

const N: u32 = 1000;

#[test]
fn full_table_refuses_new_flows_and_keeps_established_ones() {
    let t = FlowTable::new(Config { capacity: N as usize, early_drop: false, accounting: true, ..Config::default() })
        .unwrap();
    for i in 0..N {
        let v = *t.insert(&flow(i, FlowState::Tcp(TcpState::Established)), 10).unwrap().view();
        t.touch(&v, 11, 100, tcp_flags::ACK).unwrap();
    }
    assert_eq!(t.len(), N as usize);
    for i in N..N + 50 {
        assert_eq!(t.insert(&flow(i, FlowState::Udp { replied: false }), 12), Err(InsertError::Full));
    }
    assert_eq!(t.stats().full, 50);
    assert_eq!(InsertError::Full.name(), "conntrack_full");
    // Nothing was harmed: every old flow is found, with its counters.
    for i in 0..N {
        let f = flow(i, FlowState::Udp { replied: false });
        let v = t.lookup(&f.orig).expect("old flow lost");
        assert_eq!((v.dir, v.backend, v.peer()), (Dir::Original, i, f.reply));
        assert_eq!(t.lookup(&f.reply).unwrap().dir, Dir::Reply);
    }
    let flows = t.flows();
    assert_eq!(flows.len(), N as usize);
    // Diagnostics see the same flows: a count without collecting, and the
    // whole flow from a lookup of either direction.
    let mut visited = 0;
    t.for_each(|_| visited += 1);
    assert_eq!(visited, N as usize);
    let f = flow(7, FlowState::Udp { replied: false });
    for key in [f.orig, f.reply] {
        let info = t.info(&t.lookup(&key).unwrap()).unwrap();
        assert_eq!((info.orig, info.reply, info.backend), (f.orig, f.reply, 7));
    }
    assert!(flows.iter().all(|f| f.packets == [1, 0] && f.bytes == [100, 0] && f.last_seen == 11));
    // An existing flow is still answered as Existing, not refused.
    assert!(matches!(t.insert(&flow(3, FlowState::Udp { replied: false }), 13), Ok(Inserted::Existing(_))));
    t.check_invariants().unwrap();
    // Room again after a removal.
    assert!(t.remove(&flow(0, FlowState::Udp { replied: false }).orig));
    assert!(matches!(t.insert(&flow(N, FlowState::Udp { replied: false }), 14), Ok(Inserted::New(_))));
    t.check_invariants().unwrap();
}

#[test]
fn early_drop_evicts_the_oldest_unreplied_flow_only() {
    let t =
        FlowTable::new(Config { capacity: N as usize, early_drop: true, seed: Some(9), ..Config::default() }).unwrap();
    for i in 0..N {
        let v = *t.insert(&flow(i, FlowState::Udp { replied: false }), 100 + i).unwrap().view();
        // Every flow but the multiples of 10 gets a reply (becomes assured).
        if i % 10 != 0 {
            let r = t.lookup(&flow(i, FlowState::Udp { replied: false }).reply).unwrap();
            assert_eq!(t.touch(&r, 100 + i, 1, 0), Some(FlowState::Udp { replied: true }));
        } else {
            let _ = v;
        }
    }
    let unreplied_before: Vec<u32> = t.flows().iter().filter(|f| !f.state.is_assured()).map(|f| f.backend).collect();
    assert_eq!(unreplied_before.len(), (N / 10) as usize);
    let mut evicted = 0;
    for i in N..N + 20 {
        match t.insert(&flow(i, FlowState::Udp { replied: false }), 5000) {
            Ok(Inserted::New(_)) => evicted += 1,
            Err(InsertError::Full) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(evicted > 0, "early drop never found an unreplied flow near the new ones");
    assert_eq!(t.stats().early_drops, evicted);
    assert_eq!(t.len(), N as usize);
    // Every replied (assured) flow survived.
    for i in (0..N).filter(|i| i % 10 != 0) {
        assert!(t.lookup(&flow(i, FlowState::Udp { replied: false }).orig).is_some(), "assured flow {i} evicted");
    }
    t.check_invariants().unwrap();
}

#[test]
fn early_drop_never_evicts_assured_flows() {
    let t = FlowTable::new(Config { capacity: 64, early_drop: true, ..Config::default() }).unwrap();
    for i in 0..64 {
        t.insert(&flow(i, FlowState::Tcp(TcpState::Established)), 0).unwrap();
    }
    assert_eq!(t.insert(&flow(64, FlowState::Udp { replied: false }), 1), Err(InsertError::Full));
    assert_eq!(t.stats().early_drops, 0);
    assert_eq!(t.len(), 64);
}

#[test]
fn memory_is_fixed_and_reported_and_bad_sizes_are_refused() {
    let t = FlowTable::new(Config { capacity: 1 << 16, ..Config::default() }).unwrap();
    let bytes = t.memory_bytes();
    // Two 64-byte slots, two 64-byte wide entries and two 4-byte hints per
    // flow at a load of at most 0.8.
    assert!(((1 << 16) * 330..(1 << 16) * 340).contains(&bytes), "{bytes}");
    for i in 0..1000 {
        t.insert(&flow(i, FlowState::Udp { replied: false }), 0).unwrap();
    }
    assert_eq!(t.memory_bytes(), bytes);
    // Per-flow counters take 16 bytes per slot more, and only when kept.
    let counted = FlowTable::new(Config { capacity: 1 << 16, accounting: true, ..Config::default() }).unwrap();
    assert!(((1 << 16) * 40..(1 << 16) * 41).contains(&(counted.memory_bytes() - bytes)), "{}", counted.memory_bytes());
    assert!(matches!(FlowTable::new(Config { capacity: 0, ..Config::default() }), Err(TableError::ZeroCapacity)));
    let e = FlowTable::new(Config { capacity: usize::MAX / 2, ..Config::default() }).unwrap_err();
    assert!(matches!(e, TableError::TooLarge(_)));
    assert!(e.to_string().contains("maximum"), "{e}");
}

#[test]
fn expiry_follows_state_timeouts() {
    let t = FlowTable::new(Config { capacity: 16, ..Config::default() }).unwrap();
    let udp = *t.insert(&flow(1, FlowState::Udp { replied: false }), 0).unwrap().view();
    let syn = *t.insert(&flow(2, FlowState::Tcp(TcpState::SynSent)), 0).unwrap().view();
    let est = *t.insert(&flow(3, FlowState::Tcp(TcpState::Established)), 0).unwrap().view();
    // A reply at t=20 makes the UDP flow replied: 120 s from its last packet.
    let r = t.lookup(&flow(1, FlowState::Udp { replied: false }).reply).unwrap();
    t.touch(&r, 20, 1, 0);
    assert_eq!(t.sweep_all(59), 0);
    assert_eq!(t.sweep_all(60), 1, "SYN_SENT expires after 60 s");
    assert!(t.touch(&syn, 61, 1, 0).is_none(), "a removed flow's view is stale");
    assert_eq!(t.sweep_all(139), 0);
    assert_eq!(t.sweep_all(140), 1, "replied UDP expires 120 s after its last packet");
    assert!(t.touch(&udp, 141, 1, 0).is_none());
    assert_eq!(t.sweep_all(86_399), 0);
    assert_eq!(t.sweep_all(86_400), 1, "established TCP lives 24 h");
    assert!(t.touch(&est, 86_401, 1, 0).is_none());
    assert!(t.is_empty());
    assert_eq!(t.stats().expired, 3);
}
