//! Bad input never panics: arbitrary bytes, and valid frames of every shape
//! with random bytes overwritten and random truncation, go through the whole
//! pipeline (parse, conntrack, service lookup, NAT, rejects, ICMP errors).
//! The direct reading of the common shape (`wire::parse`) gives the same
//! result as the general parser on all of them.

use proptest::prelude::*;
use std::sync::Arc;
use xskgate_conntrack::{Addr, Config, FlowTable, Proto};
use xskgate_fastpath::{
    AffinityTable, Endpoint, EndpointSet, Frame, Frontend, FrontendKind, NodeConfig, ServicePort, ServicePortName,
    ServiceTable, ServiceTableBuilder, Tables, TrafficPolicy, Verdict, WorkerState, process_batch,
};

fn services() -> ServiceTable {
    let node = NodeConfig {
        addresses: vec![Addr::from_v4([198, 18, 0, 1])],
        pod_cidrs: vec!["198.19.0.0/17".parse().unwrap()],
        snat_v4: Some(Addr::from_v4([198, 18, 0, 1])),
        snat_v6: Some(Addr::from_v6("2001:db8::1".parse::<std::net::Ipv6Addr>().unwrap().octets())),
        ..NodeConfig::default()
    };
    let mut b = ServiceTableBuilder::new(node, 1);
    for (id, proto, eps) in [(1, Proto::UDP, 2), (2, Proto::TCP, 2), (3, Proto::UDP, 0), (4, Proto::TCP, 0)] {
        let endpoints: Vec<Endpoint> = (0..eps)
            .map(|i| Endpoint { addr: Addr::from_v4([198, 19, 1, 10 + i]), port: 8080, id: u32::from(i) })
            .collect();
        b.add(Arc::new(ServicePort {
            id,
            name: ServicePortName { namespace: "ns".into(), name: format!("s{id}"), port_name: String::new() },
            proto,
            frontends: vec![Frontend {
                kind: FrontendKind::LoadBalancer,
                addr: Addr::from_v4([198, 18, 100, id as u8]),
                port: 80,
            }],
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            cluster: EndpointSet::new(endpoints.clone()),
            local: EndpointSet::new(endpoints),
            affinity_timeout: (id == 1).then_some(60),
            source_ranges: vec![],
            health_check_node_port: None,
            dsr: false,
        }))
        .unwrap();
    }
    b.build()
}

fn templates() -> Vec<Vec<u8>> {
    use etherparse::PacketBuilder as B;
    let (m1, m2) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let mut out = Vec::new();
    let mut push = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = Vec::new();
        f(&mut v);
        out.push(v);
    };
    for id in 1u8..=4 {
        push(&|v| {
            B::ethernet2(m1, m2).ipv4([198, 18, 0, 10], [198, 18, 100, id], 64).udp(4000, 80).write(v, b"data").unwrap()
        });
        push(&|v| {
            B::ethernet2(m1, m2)
                .ipv4([198, 18, 0, 10], [198, 18, 100, id], 64)
                .tcp(4000, 80, 7, 100)
                .syn()
                .write(v, b"")
                .unwrap()
        });
    }
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    push(&|v| {
        B::ethernet2(m1, m2).ipv6(v6("2001:db8::10"), v6("2001:db8::1"), 64).udp(4000, 80).write(v, b"data").unwrap()
    });
    let quoted = {
        let mut q = Vec::new();
        B::ethernet2(m1, m2).ipv4([198, 18, 0, 1], [198, 19, 1, 10], 64).udp(30001, 8080).write(&mut q, b"xx").unwrap();
        q[14..].to_vec()
    };
    push(&|v| {
        B::ethernet2(m1, m2)
            .ipv4([198, 18, 50, 1], [198, 18, 0, 1], 64)
            .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(etherparse::icmpv4::DestUnreachableHeader::Port))
            .write(v, &quoted)
            .unwrap()
    });
    out
}

/// More shapes for the parser comparison: IPv6 TCP, a VLAN tag, IPv4
/// options, a fragment, and a UDP length of zero.
fn parser_templates() -> Vec<Vec<u8>> {
    use etherparse::PacketBuilder as B;
    let (m1, m2) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
    let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().unwrap().octets();
    let mut out = templates();
    let mut v = Vec::new();
    B::ethernet2(m1, m2)
        .ipv6(v6("2001:db8::10"), v6("2001:db8::1"), 64)
        .tcp(4000, 80, 7, 100)
        .ack(9)
        .write(&mut v, b"payload")
        .unwrap();
    out.push(v);
    let mut v = Vec::new();
    B::ethernet2(m1, m2)
        .single_vlan(etherparse::VlanId::try_new(7).unwrap())
        .ipv4([198, 18, 0, 10], [198, 18, 100, 1], 64)
        .udp(4000, 80)
        .write(&mut v, b"tagged")
        .unwrap();
    out.push(v);
    let plain = out[0].clone();
    // IPv4 with one word of options (NOPs): header length 6 words.
    let mut opts = plain[..34].to_vec();
    opts.extend_from_slice(&[1, 1, 1, 0]);
    opts.extend_from_slice(&plain[34..]);
    opts[14] = 0x46;
    let total = u16::from_be_bytes([opts[16], opts[17]]) + 4;
    opts[16..18].copy_from_slice(&total.to_be_bytes());
    out.push(opts);
    let mut frag = plain.clone();
    frag[20] = 0x20; // more fragments
    out.push(frag);
    let mut zero_len = plain;
    zero_len[38..40].copy_from_slice(&[0, 0]);
    out.push(zero_len);
    out
}

fn run_frames(frames_in: &[Vec<u8>]) {
    let services = services();
    let conntrack = FlowTable::new(Config { capacity: 256, ..Config::default() }).unwrap();
    let affinity = AffinityTable::new(64);
    let t = Tables { services: &services, conntrack: &conntrack, affinity: &affinity };
    let mut worker = WorkerState::new();
    let mut bufs: Vec<Vec<u8>> = frames_in
        .iter()
        .map(|f| {
            let mut b = vec![0u8; f.len().max(64) + 64];
            b[..f.len()].copy_from_slice(f);
            b
        })
        .collect();
    let mut frames: Vec<Frame<'_>> =
        bufs.iter_mut().zip(frames_in).map(|(buf, f)| Frame { buf, len: f.len() }).collect();
    let mut verdicts = vec![Verdict::Pass; frames.len()];
    process_batch(&mut frames, &t, &mut worker, 1, &mut verdicts);
    for (f, v) in frames.iter().zip(&verdicts) {
        assert!(f.len <= f.buf.len());
        if let Verdict::Drop(r) = v {
            assert!(worker.counters.drop_count(*r) > 0, "every drop is counted");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..120), 1..8)) {
        run_frames(&frames);
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        picks in prop::collection::vec((any::<prop::sample::Index>(),
                                        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
                                        any::<prop::sample::Index>()), 1..8)
    ) {
        let t = templates();
        let frames: Vec<Vec<u8>> = picks.iter().map(|(which, edits, cut)| {
            let mut f = t[which.index(t.len())].clone();
            for (at, byte) in edits {
                let i = at.index(f.len());
                f[i] = *byte;
            }
            let len = f.len() - cut.index(f.len() / 4 + 1);
            f.truncate(len);
            f
        }).collect();
        run_frames(&frames);
    }

    #[test]
    fn common_shape_parser_agrees_with_general_parser(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((0usize..80, any::<u8>()), 0..4),
        cut in 0usize..40,
    ) {
        let t = parser_templates();
        let mut f = t[which.index(t.len())].clone();
        for (at, byte) in edits {
            if at < f.len() {
                f[at] = byte;
            }
        }
        f.truncate(f.len().saturating_sub(cut));
        prop_assert_eq!(
            xskgate_fastpath::wire::parse(&f),
            xskgate_fastpath::wire::parse_general(&f),
            "frame {:02x?}", f
        );
    }
}

/// Found by the `parse` fuzz target: IPv6 with a payload length of 0 (a
/// jumbogram's) and a hop-by-hop header. etherparse reads on to the end of
/// the frame, so the transport header began past the IP payload's end; it
/// is malformed now, from both parsers.
#[test]
fn fuzz_regression_ipv6_payload_length_zero_with_an_extension_header() {
    let frame: &[u8] = &[
        2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 10, 134, 221, 96, 1, 0, 0, 0, 0, 0, 11, 17, 64, 32, 1, 13, 184, 0, 0, 0, 0, 0,
        0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 32, 1, 13, 0, 0, 0, 16, 32, 1, 13, 184, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 156,
        96, 0, 64, 80, 0, 11, 32, 92, 119, 104, 111,
    ];
    assert_eq!(xskgate_fastpath::wire::parse(frame), Err(xskgate_fastpath::wire::Unparsed::Malformed));
    assert_eq!(xskgate_fastpath::wire::parse_general(frame), Err(xskgate_fastpath::wire::Unparsed::Malformed));
}
