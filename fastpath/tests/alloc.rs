//! The pipeline makes no allocation per packet: a counting global allocator
//! watches 2,000 batches after warm-up, covering established flows in both
//! directions, new flows (with SNAT port allocation and ClientIP affinity),
//! drops, passes and generated rejects. Its own test binary, so no other
//! test allocates meanwhile.

use std::sync::Arc;
use xskgate_conntrack::{Addr, Config, FlowTable, Proto};
use xskgate_fastpath::{
    AffinityTable, BATCH, Endpoint, EndpointSet, Frame, Frontend, FrontendKind, NodeConfig, ServicePort,
    ServicePortName, ServiceTableBuilder, ServiceTableHandle, Tables, TrafficPolicy, Verdict, WorkerState,
    process_batch,
};
use xskgate_tests::alloc::{CountingAlloc, allocations};

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let mut v = Vec::new();
    b.write(&mut v, b"payload").unwrap();
    v
}

#[test]
fn no_allocation_per_packet_after_warm_up() {
    let pods = [[198, 19, 1, 10], [198, 19, 2, 10], [198, 19, 3, 10]];
    let port = |id: u32, addr: [u8; 4], affinity: Option<u32>, eps: Vec<Endpoint>| {
        Arc::new(ServicePort {
            id,
            name: ServicePortName { namespace: "default".into(), name: format!("s{id}"), port_name: String::new() },
            proto: Proto::UDP,
            frontends: vec![Frontend { kind: FrontendKind::LoadBalancer, addr: Addr::from_v4(addr), port: 80 }],
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            cluster: EndpointSet::new(eps.clone()),
            local: EndpointSet::new(eps),
            affinity_timeout: affinity,
            source_ranges: vec![],
            health_check_node_port: None,
            dsr: false,
        })
    };
    let eps: Vec<Endpoint> =
        pods.iter().enumerate().map(|(i, p)| Endpoint { addr: Addr::from_v4(*p), port: 8080, id: i as u32 }).collect();
    let node = NodeConfig {
        addresses: vec![Addr::from_v4([198, 18, 0, 1])],
        snat_v4: Some(Addr::from_v4([198, 18, 0, 1])),
        ..NodeConfig::default()
    };
    let mut b = ServiceTableBuilder::new(node, 1);
    b.add(port(1, [198, 18, 100, 1], None, eps.clone())).unwrap();
    b.add(port(2, [198, 18, 100, 2], Some(10_800), eps)).unwrap();
    b.add(port(3, [198, 18, 100, 3], None, vec![])).unwrap(); // rejects
    let handle = ServiceTableHandle::new(b.build());
    let conntrack = FlowTable::new(Config { capacity: 1 << 16, ..Config::default() }).unwrap();
    let affinity = AffinityTable::new(4096);
    let mut worker = WorkerState::new();
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; 2048]).collect();
    let mut verdicts = [Verdict::Pass; BATCH];

    // A batch of mixed traffic; `round` varies source ports so that every
    // round creates new flows as well as hitting established ones.
    let templates = |round: u16| -> Vec<Vec<u8>> {
        (0..BATCH as u16)
            .map(|i| match i % 8 {
                0..=2 => udp([198, 18, 0, 10], 10_000 + i, [198, 18, 100, 1], 80), // established after round 0
                3 => udp([198, 18, 0, 11], 20_000 + (round % 40_000), [198, 18, 100, 1], 80), // new flow
                4 => udp([198, 18, 0, 12], 20_000 + (round % 40_000), [198, 18, 100, 2], 80), // new, affinity
                5 => udp([198, 18, 0, 13], 1000 + i, [198, 18, 100, 3], 80),       // reject
                6 => udp([198, 18, 0, 14], 1000, [198, 18, 0, 1], 22),             // pass
                _ => udp([198, 18, 0, 15], 1000, [198, 18, 100, 1], 80)[..30].to_vec(), // malformed
            })
            .collect()
    };
    let all_templates: Vec<Vec<Vec<u8>>> = (0..2_001).map(templates).collect();
    let mut run = |round: usize, worker: &mut WorkerState| {
        let table = handle.load();
        let t = Tables { services: &table, conntrack: &conntrack, affinity: &affinity };
        let mut frames: [Frame<'_>; BATCH] = {
            let mut it = bufs.iter_mut();
            std::array::from_fn(|_| {
                let buf = it.next().expect("BATCH buffers");
                Frame { buf, len: 0 }
            })
        };
        for (f, tpl) in frames.iter_mut().zip(&all_templates[round]) {
            f.buf[..tpl.len()].copy_from_slice(tpl);
            f.len = tpl.len();
        }
        process_batch(&mut frames, &t, worker, 100 + round as u32, &mut verdicts);
    };

    run(0, &mut worker); // warm-up: the established flows are created here
    let before = allocations();
    for round in 1..=2_000 {
        run(round, &mut worker);
    }
    let allocations = allocations() - before;
    let c = &worker.counters;
    assert!(c.forwarded > 2_000 * 40 && c.flows_created > 4_000, "traffic did not flow: {c:?}");
    assert!(c.rejected >= 2_000 * 8 && c.passed >= 2_000 * 8);
    assert_eq!(allocations, 0, "the pipeline allocated {allocations} times in 2,000 batches");
}
