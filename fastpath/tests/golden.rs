//! Golden packets: frames built with etherparse's `PacketBuilder`, run
//! through the pipeline, compared byte for byte with the expected frame
//! (built the same way, so every checksum is a full recomputation), and with
//! the expected verdict and counters. Plus every truncation of every input.
//!
//! The topology, all in 198.18.0.0/15 and 2001:db8::/32:
//! client 198.18.0.10 — gateway 198.18.0.1 (node address, SNAT address)
//! — pods 198.19.1.10 (pod-a, local) and 198.19.2.10 (pod-b, remote).
//! LoadBalancer IP 198.18.100.1:80, ClusterIP 198.19.128.10:80, NodePort
//! 30080, pod CIDR 198.19.0.0/17.

use etherparse::{
    IpHeaders, Ipv4Extensions, Ipv4Header, Ipv4Options, PacketBuilder, VlanId, icmpv4::DestUnreachableHeader,
};
use std::net::Ipv6Addr;
use std::sync::Arc;
use xskgate_conntrack::{Addr, Config, FlowTable, Proto};
use xskgate_fastpath::checksum;
use xskgate_fastpath::trace::{NoTrace, Recorder, Step, Trace};
use xskgate_fastpath::{
    AffinityTable, Cidr, DropReason, Endpoint, EndpointSet, Frame, Frontend, FrontendKind, MasqueradeRule, NodeConfig,
    ServicePort, ServicePortName, ServiceTable, ServiceTableBuilder, Tables, TrafficPolicy, Verdict, VipEcho,
    WorkerState, process, process_batch_traced,
};

const CLIENT: [u8; 4] = [198, 18, 0, 10];
const CLIENT2: [u8; 4] = [198, 18, 5, 5];
const GW: [u8; 4] = [198, 18, 0, 1];
const LB: [u8; 4] = [198, 18, 100, 1];
const CLUSTER_IP: [u8; 4] = [198, 19, 128, 10];
const POD_A: [u8; 4] = [198, 19, 1, 10];
const POD_B: [u8; 4] = [198, 19, 2, 10];
const POD_C: [u8; 4] = [198, 19, 3, 10];
const ROUTER: [u8; 4] = [198, 18, 50, 1];
const MAC_CLIENT: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
const MAC_GW: [u8; 6] = [2, 0, 0, 0, 0, 0x01];
const NODE_PORT: u16 = 30080;
const SNAT_PORTS: (u16, u16) = (30000, 30999);
const PAYLOAD: &[u8] = b"hello, service";

fn v6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap().octets()
}

fn ep(a: [u8; 4], id: u32) -> Endpoint {
    Endpoint { addr: Addr::from_v4(a), port: 8080, id }
}

struct Svc {
    external: TrafficPolicy,
    internal: TrafficPolicy,
    cluster: Vec<Endpoint>,
    local: Vec<Endpoint>,
    affinity: Option<u32>,
    ranges: Vec<&'static str>,
    proto: Proto,
    dsr: bool,
}

impl Default for Svc {
    fn default() -> Svc {
        Svc {
            external: TrafficPolicy::Cluster,
            internal: TrafficPolicy::Cluster,
            cluster: vec![ep(POD_A, 1), ep(POD_B, 2)],
            local: vec![ep(POD_A, 1)],
            affinity: None,
            ranges: vec![],
            proto: Proto::UDP,
            dsr: false,
        }
    }
}

fn node() -> NodeConfig {
    NodeConfig {
        addresses: vec![Addr::from_v4(GW), Addr::from_v6(v6("2001:db8::1"))],
        pod_cidrs: vec!["198.19.0.0/17".parse().unwrap(), "2001:db8:1::/48".parse().unwrap()],
        snat_v4: Some(Addr::from_v4(GW)),
        snat_v6: Some(Addr::from_v6(v6("2001:db8::1"))),
        snat_ports: SNAT_PORTS,
        snat_routes: Vec::new(),
        vip_echo: VipEcho::Served,
    }
}

fn table(svcs: &[Svc]) -> ServiceTable {
    table_on(svcs, node())
}

fn table_on(svcs: &[Svc], node: NodeConfig) -> ServiceTable {
    let mut b = ServiceTableBuilder::new(node, 1);
    for (i, s) in svcs.iter().enumerate() {
        let i16 = i as u16;
        b.add(Arc::new(ServicePort {
            id: 10 + i as u32,
            name: ServicePortName { namespace: "default".into(), name: format!("svc{i}"), port_name: "http".into() },
            proto: s.proto,
            frontends: vec![
                Frontend { kind: FrontendKind::ClusterIp, addr: Addr::from_v4(CLUSTER_IP), port: 80 + i16 },
                Frontend { kind: FrontendKind::LoadBalancer, addr: Addr::from_v4(LB), port: 80 + i16 },
                Frontend { kind: FrontendKind::NodePort, addr: Addr::from_v4([0, 0, 0, 0]), port: NODE_PORT + i16 },
            ],
            external_policy: s.external,
            internal_policy: s.internal,
            cluster: EndpointSet::new(s.cluster.clone()),
            local: EndpointSet::new(s.local.clone()),
            affinity_timeout: s.affinity,
            source_ranges: s.ranges.iter().map(|r| r.parse::<Cidr>().unwrap()).collect(),
            health_check_node_port: None,
            dsr: s.dsr,
        }))
        .unwrap();
    }
    b.build()
}

struct Gw {
    services: ServiceTable,
    conntrack: FlowTable,
    affinity: AffinityTable,
    worker: WorkerState,
    /// The clock the pipeline is given (seconds).
    now: u32,
}

impl Gw {
    fn new(svcs: &[Svc]) -> Gw {
        Gw::with_node(svcs, node())
    }

    fn with_node(svcs: &[Svc], node: NodeConfig) -> Gw {
        Gw {
            services: table_on(svcs, node),
            conntrack: FlowTable::new(Config { capacity: 4096, ..Config::default() }).unwrap(),
            affinity: AffinityTable::new(1024),
            worker: WorkerState::new(),
            now: 100,
        }
    }

    /// Runs one frame through the pipeline (via a batch of one), returning
    /// the verdict and the frame as it left.
    fn run(&mut self, input: &[u8]) -> (Verdict, Vec<u8>) {
        self.run_batch(&[input.to_vec()]).remove(0)
    }

    /// Runs frames through the pipeline as one batch.
    fn run_batch(&mut self, inputs: &[Vec<u8>]) -> Vec<(Verdict, Vec<u8>)> {
        self.run_batch_traced(inputs, &mut NoTrace)
    }

    /// [`Gw::run_batch`], reporting the stages to `trace`.
    fn run_batch_traced(&mut self, inputs: &[Vec<u8>], trace: &mut impl Trace) -> Vec<(Verdict, Vec<u8>)> {
        let mut bufs: Vec<Vec<u8>> = inputs.iter().map(|_| vec![0u8; 2048]).collect();
        let t = Tables { services: &self.services, conntrack: &self.conntrack, affinity: &self.affinity };
        let mut frames: Vec<Frame<'_>> = bufs
            .iter_mut()
            .zip(inputs)
            .map(|(buf, input)| {
                buf[..input.len()].copy_from_slice(input);
                Frame { buf, len: input.len() }
            })
            .collect();
        let mut verdicts = vec![Verdict::Pass; inputs.len()];
        process_batch_traced(&mut frames, &t, &mut self.worker, self.now, &mut verdicts, trace);
        let lens: Vec<usize> = frames.iter().map(|f| f.len).collect();
        verdicts.into_iter().zip(bufs.iter().zip(lens)).map(|(v, (b, len))| (v, b[..len].to_vec())).collect()
    }

    fn drops(&self, r: DropReason) -> u64 {
        self.worker.counters.drop_count(r)
    }
}

fn udp4(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, ttl: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW).ipv4(src, dst, ttl).udp(sport, dport);
    let mut v = Vec::with_capacity(b.size(PAYLOAD.len()));
    b.write(&mut v, PAYLOAD).unwrap();
    v
}

fn tcp4_syn(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW).ipv4(src, dst, 64).tcp(sport, dport, 1000, 64240).syn();
    let mut v = Vec::new();
    b.write(&mut v, &[]).unwrap();
    v
}

fn udp6(src: [u8; 16], sport: u16, dst: [u8; 16], dport: u16, hops: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW).ipv6(src, dst, hops).udp(sport, dport);
    let mut v = Vec::new();
    b.write(&mut v, PAYLOAD).unwrap();
    v
}

/// (src, sport, dst, dport) of a UDP/TCP frame.
fn tuple(frame: &[u8]) -> (Addr, u16, Addr, u16) {
    let p = xskgate_fastpath::wire::parse(frame).unwrap();
    (p.src, p.sport, p.dst, p.dport)
}

fn v4(a: Addr) -> [u8; 4] {
    a.as_v4().unwrap()
}

// ---------------------------------------------------------------- trace

/// The trace changes nothing: a traced batch gives the same verdicts and
/// bytes as an untraced one, and each frame's steps are the stages it went
/// through, in order, ending in its verdict.
#[test]
fn a_traced_batch_decides_the_same_and_records_each_stage() {
    let svcs = [Svc::default()];
    let batch =
        vec![udp4(CLIENT, 40000, LB, 80, 64), udp4(CLIENT2, 40001, LB, 80, 64), udp4(CLIENT, 40000, LB, 9999, 64)];
    let plain = Gw::new(&svcs).run_batch(&batch);
    let mut recorder = Recorder::default();
    let mut gw = Gw::new(&svcs);
    let traced = gw.run_batch_traced(&batch, &mut recorder);
    assert_eq!(plain, traced);
    for (i, (v, _)) in traced.iter().enumerate() {
        assert_eq!(recorder.of(i).last(), Some(&Step::Verdict(*v)), "frame {i}");
    }
    let stages = |r: &Recorder, i| {
        r.of(i).map(|s| format!("{s:?}").split([' ', '(']).next().unwrap().to_string()).collect::<Vec<_>>()
    };
    assert_eq!(
        stages(&recorder, 0),
        ["Parsed", "Frontend", "SourceRanges", "Class", "Endpoint", "Masquerade", "Rewrite", "Verdict"],
        "a new Cluster flow"
    );
    assert!(recorder.of(0).any(|s| matches!(s, Step::Masquerade { rule: Some(MasqueradeRule::ExternalCluster), .. })));
    assert_eq!(stages(&recorder, 2), ["Parsed", "Frontend", "Verdict"], "no Service on that port");
    // The first flow's next packet, in a later batch, is tracked.
    let mut again = Recorder::default();
    gw.run_batch_traced(&batch[..1], &mut again);
    assert_eq!(stages(&again, 0), ["Parsed", "Tracked", "Rewrite", "Verdict"]);
    let mut local = Recorder::default();
    Gw::new(&[Svc { external: TrafficPolicy::Local, ..Svc::default() }]).run_batch_traced(&batch[..1], &mut local);
    assert!(local.of(0).any(|s| matches!(s, Step::Masquerade { rule: None, .. })), "Local keeps the client");
}

// ---------------------------------------------------------------- Cluster / Local

#[test]
fn cluster_policy_snats_to_the_gateway_and_reply_is_reversed() {
    let mut gw = Gw::new(&[Svc::default()]);
    let (v, out) = gw.run(&udp4(CLIENT, 40000, LB, 80, 64));
    let (src, sport, dst, dport) = tuple(&out);
    assert_eq!(v, Verdict::Forward { next_hop: dst });
    assert_eq!(src, Addr::from_v4(GW), "Cluster: the pod sees the gateway's address");
    assert!((SNAT_PORTS.0..=SNAT_PORTS.1).contains(&sport));
    assert!(dst == Addr::from_v4(POD_A) || dst == Addr::from_v4(POD_B));
    assert_eq!(dport, 8080);
    assert_eq!(out, udp4(GW, sport, v4(dst), 8080, 63), "exact bytes, checksums recomputed in full");

    // The pod's answer comes back to the gateway and leaves as the VIP.
    let (v, back) = gw.run(&udp4(v4(dst), 8080, GW, sport, 64));
    assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(CLIENT) });
    assert_eq!(back, udp4(LB, 80, CLIENT, 40000, 63));
    // Per-service counters saw both packets.
    let c = gw.worker.counters.service(10);
    assert_eq!(c.packets, 2);
    assert_eq!(c.bytes, 2 * (20 + 8 + PAYLOAD.len() as u64));
}

#[test]
fn local_policy_keeps_the_client_address_and_reply_is_reversed() {
    let mut gw = Gw::new(&[Svc { external: TrafficPolicy::Local, ..Svc::default() }]);
    for _ in 0..2 {
        let (v, out) = gw.run(&udp4(CLIENT, 40000, LB, 80, 64));
        assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(POD_A) });
        assert_eq!(out, udp4(CLIENT, 40000, POD_A, 8080, 63), "Local: only pod-a, client address kept");
    }
    let (v, back) = gw.run(&udp4(POD_A, 8080, CLIENT, 40000, 64));
    assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(CLIENT) });
    assert_eq!(back, udp4(LB, 80, CLIENT, 40000, 63));
    assert_eq!(gw.worker.counters.flows_created, 1);
}

#[test]
fn local_policy_without_local_endpoint_drops_and_counts() {
    let svc = Svc { external: TrafficPolicy::Local, local: vec![], ..Svc::default() };
    let mut gw = Gw::new(&[svc]);
    for frontend in [udp4(CLIENT, 40000, LB, 80, 64), udp4(CLIENT, 40001, GW, NODE_PORT, 64)] {
        let (v, out) = gw.run(&frontend);
        assert_eq!(v, Verdict::Drop(DropReason::NoLocalEndpoints));
        assert_eq!(out, frontend, "a dropped frame is left as it was");
    }
    assert_eq!(gw.drops(DropReason::NoLocalEndpoints), 2);
    assert_eq!(DropReason::NoLocalEndpoints.name(), "no_local_endpoints");
    assert!(gw.conntrack.is_empty());
}

#[test]
fn pod_to_loadbalancer_ip_is_internal_and_uses_the_cluster_set() {
    // External Local with no local endpoint: outside clients are dropped...
    let svc = Svc { external: TrafficPolicy::Local, local: vec![], ..Svc::default() };
    let mut gw = Gw::new(&[svc]);
    assert_eq!(gw.run(&udp4(CLIENT, 40000, LB, 80, 64)).0, Verdict::Drop(DropReason::NoLocalEndpoints));
    // ...but a pod reaching the same LoadBalancer IP is internal traffic:
    // Cluster set, no masquerade.
    let (v, out) = gw.run(&udp4(POD_C, 50000, LB, 80, 64));
    let (src, sport, dst, _) = tuple(&out);
    assert_eq!(v, Verdict::Forward { next_hop: dst });
    assert_eq!((src, sport), (Addr::from_v4(POD_C), 50000), "no SNAT for internal traffic");
    assert_eq!(out, udp4(POD_C, 50000, v4(dst), 8080, 63));
}

#[test]
fn internal_traffic_policy_local_applies_to_cluster_ip() {
    let svc = Svc { internal: TrafficPolicy::Local, local: vec![], ..Svc::default() };
    let mut gw = Gw::new(&[svc]);
    assert_eq!(gw.run(&udp4(POD_C, 50000, CLUSTER_IP, 80, 64)).0, Verdict::Drop(DropReason::NoLocalEndpoints));
    // External Cluster is unaffected.
    assert!(matches!(gw.run(&udp4(CLIENT, 40000, LB, 80, 64)).0, Verdict::Forward { .. }));
}

#[test]
fn cluster_ip_from_outside_the_pod_cidr_is_masqueraded_and_hairpin_too() {
    let only_a = Svc { cluster: vec![ep(POD_A, 1)], ..Svc::default() };
    let mut gw = Gw::new(&[only_a]);
    // A non-pod source reaching a ClusterIP: masquerade (kube-proxy `! -s clusterCIDR`).
    let (_, out) = gw.run(&udp4(CLIENT, 40000, CLUSTER_IP, 80, 64));
    assert_eq!(tuple(&out).0, Addr::from_v4(GW));
    // pod-a reaching its own service and landing on itself: hairpin SNAT.
    let (_, out) = gw.run(&udp4(POD_A, 50000, CLUSTER_IP, 80, 64));
    let (src, sport, dst, _) = tuple(&out);
    assert_eq!((src, dst), (Addr::from_v4(GW), Addr::from_v4(POD_A)));
    assert_eq!(out, udp4(GW, sport, POD_A, 8080, 63));
    // Another pod reaching it: no SNAT.
    let (_, out) = gw.run(&udp4(POD_C, 50000, CLUSTER_IP, 80, 64));
    assert_eq!(tuple(&out).0, Addr::from_v4(POD_C));
}

#[test]
fn node_port_on_the_gateway_address() {
    let mut gw = Gw::new(&[Svc::default()]);
    let (v, out) = gw.run(&udp4(CLIENT, 40000, GW, NODE_PORT, 64));
    assert!(matches!(v, Verdict::Forward { .. }));
    assert_eq!(tuple(&out).0, Addr::from_v4(GW));
    // Another port of the gateway is the kernel's (SSH, kubelet, ...).
    assert_eq!(gw.run(&udp4(CLIENT, 40000, GW, 22, 64)).0, Verdict::Pass);
    assert_eq!(gw.run(&udp4(CLIENT, 40000, [198, 18, 0, 99], NODE_PORT, 64)).0, Verdict::Pass);
}

// ---------------------------------------------------------------- rejects

#[test]
fn no_endpoints_tcp_gets_a_reset() {
    let mut gw = Gw::new(&[Svc { proto: Proto::TCP, cluster: vec![], local: vec![], ..Svc::default() }]);
    let (v, out) = gw.run(&tcp4_syn(CLIENT, 40000, LB, 80));
    assert_eq!(v, Verdict::Reply);
    let b = PacketBuilder::ethernet2(MAC_GW, MAC_CLIENT).ipv4(LB, CLIENT, 64).tcp(80, 40000, 0, 0).rst().ack(1001);
    let mut want = Vec::new();
    b.write(&mut want, &[]).unwrap();
    assert_eq!(out, want, "RST|ACK, ack = seq + 1 for the SYN, back to the client");
    assert_eq!(gw.worker.counters.rejected, 1);
    // A RST is never answered.
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW).ipv4(CLIENT, LB, 64).tcp(40000, 80, 5, 0).rst();
    let mut rst = Vec::new();
    b.write(&mut rst, &[]).unwrap();
    assert_eq!(gw.run(&rst).0, Verdict::Drop(DropReason::NoEndpoints));
}

#[test]
fn no_endpoints_udp_gets_port_unreachable() {
    let mut gw = Gw::new(&[Svc { cluster: vec![], local: vec![], ..Svc::default() }]);
    let input = udp4(CLIENT, 40000, LB, 80, 64);
    let (v, out) = gw.run(&input);
    assert_eq!(v, Verdict::Reply);
    let b = PacketBuilder::ethernet2(MAC_GW, MAC_CLIENT)
        .ipv4(LB, CLIENT, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port));
    let mut want = Vec::new();
    b.write(&mut want, &input[14..]).unwrap();
    assert_eq!(out, want, "ICMP port unreachable quoting the datagram");
}

#[test]
fn no_endpoints_udp6_gets_port_unreachable() {
    let mut gw6 = gw_v6(vec![], vec![], TrafficPolicy::Cluster);
    let input = udp6(v6("2001:db8::10"), 40000, v6("2001:db8:100::1"), 80, 64);
    let (v, out) = gw6.run(&input);
    assert_eq!(v, Verdict::Reply);
    let b = PacketBuilder::ethernet2(MAC_GW, MAC_CLIENT)
        .ipv6(v6("2001:db8:100::1"), v6("2001:db8::10"), 64)
        .icmpv6(etherparse::Icmpv6Type::DestinationUnreachable(etherparse::icmpv6::DestUnreachableCode::Port));
    let mut want = Vec::new();
    b.write(&mut want, &input[14..]).unwrap();
    assert_eq!(out, want);
}

// ---------------------------------------------------------------- ICMP errors

#[test]
fn icmp_fragmentation_needed_for_a_natted_flow_is_translated() {
    let mut gw = Gw::new(&[Svc::default()]);
    let (_, out) = gw.run(&udp4(CLIENT, 40000, LB, 80, 64));
    // A router between the gateway and the pod answers "fragmentation
    // needed", quoting the IP header and 8 bytes of what it received.
    let quote = &out[14..14 + 28];
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW).ipv4(ROUTER, GW, 64).icmpv4(
        etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }),
    );
    let mut err = Vec::new();
    b.write(&mut err, quote).unwrap();
    let (v, translated) = gw.run(&err);
    assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(CLIENT) });
    // The client must see an error about the packet it sent (to the VIP).
    let original = udp4(CLIENT, 40000, LB, 80, 63);
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW).ipv4(ROUTER, CLIENT, 63).icmpv4(
        etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }),
    );
    let mut want = Vec::new();
    b.write(&mut want, &original[14..14 + 28]).unwrap();
    assert_eq!(translated, want, "outer and embedded headers translated, all checksums right");
    assert_eq!(gw.worker.counters.icmp_errors_translated, 1);
    // An error about a flow we do not track is the kernel's.
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW)
        .ipv4(ROUTER, GW, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port));
    let mut other = Vec::new();
    b.write(&mut other, &udp4(GW, 1234, [198, 18, 9, 9], 53, 64)[14..14 + 28]).unwrap();
    assert_eq!(gw.run(&other).0, Verdict::Pass);
}

/// The endpoint's own error (the pod's port unreachable) reaches the client
/// from the VIP it sent to, as Linux's NAT writes it; a router's keeps the
/// router's address (above).
#[test]
fn the_endpoints_own_icmp_error_comes_from_the_vip() {
    let mut gw = Gw::new(&[Svc::default()]);
    let (v, out) = gw.run(&udp4(CLIENT, 40000, LB, 80, 64));
    let Verdict::Forward { next_hop } = v else { panic!("{v:?}") };
    let pod: [u8; 4] = next_hop.as_v4().unwrap();
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW)
        .ipv4(pod, GW, 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port));
    let mut err = Vec::new();
    b.write(&mut err, &out[14..14 + 28]).unwrap();
    let (v, translated) = gw.run(&err);
    assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(CLIENT) });
    let original = udp4(CLIENT, 40000, LB, 80, 63);
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW)
        .ipv4(LB, CLIENT, 63)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port));
    let mut want = Vec::new();
    b.write(&mut want, &original[14..14 + 28]).unwrap();
    assert_eq!(translated, want, "from the VIP, about the packet the client sent");
}

#[test]
fn icmp_time_exceeded_towards_the_pod_for_a_local_flow() {
    // Local: the reply (VIP -> client) hits a router that sends Time
    // Exceeded to the VIP; the pod must receive it about its own packet.
    let mut gw = Gw::new(&[Svc { external: TrafficPolicy::Local, ..Svc::default() }]);
    gw.run(&udp4(CLIENT, 40000, LB, 80, 64));
    let (_, back) = gw.run(&udp4(POD_A, 8080, CLIENT, 40000, 64));
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW)
        .ipv4(ROUTER, LB, 64)
        .icmpv4(etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit));
    let mut err = Vec::new();
    b.write(&mut err, &back[14..]).unwrap();
    let (v, translated) = gw.run(&err);
    assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(POD_A) });
    let pod_sent = udp4(POD_A, 8080, CLIENT, 40000, 63);
    let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW)
        .ipv4(ROUTER, POD_A, 63)
        .icmpv4(etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit));
    let mut want = Vec::new();
    b.write(&mut want, &pod_sent[14..]).unwrap();
    assert_eq!(translated, want);
}

// ---------------------------------------------------------------- affinity, ranges

#[test]
fn client_ip_affinity_sticks_and_plain_maglev_spreads() {
    let four = vec![ep(POD_A, 1), ep(POD_B, 2), ep(POD_C, 3), ep([198, 19, 4, 10], 4)];
    let mut sticky = Gw::new(&[Svc { cluster: four.clone(), affinity: Some(10_800), ..Svc::default() }]);
    let mut plain = Gw::new(&[Svc { cluster: four, ..Svc::default() }]);
    let mut sticky_seen = std::collections::HashSet::new();
    let mut plain_seen = std::collections::HashSet::new();
    for port in 40000..40032 {
        sticky_seen.insert(tuple(&sticky.run(&udp4(CLIENT, port, LB, 80, 64)).1).2);
        plain_seen.insert(tuple(&plain.run(&udp4(CLIENT, port, LB, 80, 64)).1).2);
    }
    assert_eq!(sticky_seen.len(), 1, "ClientIP affinity: one endpoint for every flow of the client");
    assert!(plain_seen.len() >= 3, "without affinity flows spread: {plain_seen:?}");
}

#[test]
fn load_balancer_source_ranges_apply_to_the_lb_ip_only() {
    let mut gw = Gw::new(&[Svc { ranges: vec!["198.18.0.0/24"], ..Svc::default() }]);
    assert!(matches!(gw.run(&udp4(CLIENT, 40000, LB, 80, 64)).0, Verdict::Forward { .. }));
    let outside = udp4(CLIENT2, 40000, LB, 80, 64);
    assert_eq!(gw.run(&outside).0, Verdict::Drop(DropReason::SourceRange));
    assert_eq!(gw.drops(DropReason::SourceRange), 1);
    // The same client through the NodePort or the ClusterIP is not filtered.
    assert!(matches!(gw.run(&udp4(CLIENT2, 40000, GW, NODE_PORT, 64)).0, Verdict::Forward { .. }));
    assert!(matches!(gw.run(&udp4(CLIENT2, 40001, CLUSTER_IP, 80, 64)).0, Verdict::Forward { .. }));
}

// ---------------------------------------------------------------- IPv6, VLAN, options

fn gw_v6(cluster: Vec<Endpoint>, local: Vec<Endpoint>, external: TrafficPolicy) -> Gw {
    let mut b = ServiceTableBuilder::new(node(), 1);
    b.add(Arc::new(ServicePort {
        id: 20,
        name: ServicePortName { namespace: "default".into(), name: "v6".into(), port_name: String::new() },
        proto: Proto::UDP,
        frontends: vec![Frontend {
            kind: FrontendKind::LoadBalancer,
            addr: Addr::from_v6(v6("2001:db8:100::1")),
            port: 80,
        }],
        external_policy: external,
        internal_policy: TrafficPolicy::Cluster,
        cluster: EndpointSet::new(cluster),
        local: EndpointSet::new(local),
        affinity_timeout: None,
        source_ranges: vec![],
        health_check_node_port: None,
        dsr: false,
    }))
    .unwrap();
    Gw {
        services: b.build(),
        conntrack: FlowTable::new(Config { capacity: 1024, ..Config::default() }).unwrap(),
        affinity: AffinityTable::new(64),
        worker: WorkerState::new(),
        now: 100,
    }
}

fn echo4(src: [u8; 4], dst: [u8; 4], request: bool) -> Vec<u8> {
    let (from, to) = if request { (MAC_CLIENT, MAC_GW) } else { (MAC_GW, MAC_CLIENT) };
    let ip = PacketBuilder::ethernet2(from, to).ipv4(src, dst, 64);
    let b = if request { ip.icmpv4_echo_request(7, 3) } else { ip.icmpv4_echo_reply(7, 3) };
    let mut v = Vec::new();
    b.write(&mut v, PAYLOAD).unwrap();
    v
}

fn echo6(src: [u8; 16], dst: [u8; 16], request: bool) -> Vec<u8> {
    let (from, to) = if request { (MAC_CLIENT, MAC_GW) } else { (MAC_GW, MAC_CLIENT) };
    let ip = PacketBuilder::ethernet2(from, to).ipv6(src, dst, 64);
    let b = if request { ip.icmpv6_echo_request(7, 3) } else { ip.icmpv6_echo_reply(7, 3) };
    let mut v = Vec::new();
    b.write(&mut v, PAYLOAD).unwrap();
    v
}

/// Seed 000: a ping of the LoadBalancer IP is answered by the gateway only
/// where a connection to the Service would be served (Local: a local
/// endpoint); elsewhere it is dropped and counted. `--vip-echo always`
/// answers regardless, `never` leaves every ping to the kernel, and a ping
/// of an address that is no VIP (the node, a ClusterIP) is the kernel's.
#[test]
fn ping_of_a_vip_is_answered_only_where_the_service_is_served() {
    let served = Svc { external: TrafficPolicy::Local, ..Svc::default() };
    let mut gw = Gw::new(&[served]);
    let (v, out) = gw.run(&echo4(CLIENT, LB, true));
    assert_eq!(v, Verdict::Reply);
    assert_eq!(out, echo4(LB, CLIENT, false), "an echo reply from the VIP, id/seq/data kept");
    assert_eq!(gw.worker.counters.echo_replies, 1);
    assert_eq!(gw.worker.counters.rejected, 0, "an answer is not a reject");
    for kernels in [echo4(CLIENT, GW, true), echo4(CLIENT, CLUSTER_IP, true), echo4(LB, CLIENT, false)] {
        assert_eq!(gw.run(&kernels).0, Verdict::Pass);
    }

    let unserved = || Svc { external: TrafficPolicy::Local, local: vec![], ..Svc::default() };
    let mut gw = Gw::new(&[unserved()]);
    let request = echo4(CLIENT, LB, true);
    let (v, out) = gw.run(&request);
    assert_eq!(v, Verdict::Drop(DropReason::EchoNotServed));
    assert_eq!(out, request);
    assert_eq!(gw.drops(DropReason::EchoNotServed), 1);
    // Served by one of the VIP's Services is enough.
    let mut gw = Gw::new(&[unserved(), Svc::default()]);
    assert_eq!(gw.run(&request).0, Verdict::Reply);

    let mut always = Gw::with_node(&[unserved()], NodeConfig { vip_echo: VipEcho::Always, ..node() });
    assert_eq!(always.run(&request).0, Verdict::Reply);
    let mut never = Gw::with_node(&[Svc::default()], NodeConfig { vip_echo: VipEcho::Never, ..node() });
    assert_eq!(never.run(&request).0, Verdict::Pass);

    let pod = Endpoint { addr: Addr::from_v6(v6("2001:db8:1::10")), port: 8080, id: 5 };
    let (client, vip) = (v6("2001:db8::10"), v6("2001:db8:100::1"));
    let mut local = gw_v6(vec![pod], vec![pod], TrafficPolicy::Local);
    let (v, out) = local.run(&echo6(client, vip, true));
    assert_eq!(v, Verdict::Reply);
    assert_eq!(out, echo6(vip, client, false));
    let mut elsewhere = gw_v6(vec![pod], vec![], TrafficPolicy::Local);
    assert_eq!(elsewhere.run(&echo6(client, vip, true)).0, Verdict::Drop(DropReason::EchoNotServed));
}

#[test]
fn ipv6_local_and_cluster() {
    let pod = Endpoint { addr: Addr::from_v6(v6("2001:db8:1::10")), port: 8080, id: 5 };
    let client = v6("2001:db8::10");
    let vip = v6("2001:db8:100::1");
    let mut local = gw_v6(vec![pod], vec![pod], TrafficPolicy::Local);
    let (v, out) = local.run(&udp6(client, 40000, vip, 80, 64));
    assert_eq!(v, Verdict::Forward { next_hop: pod.addr });
    assert_eq!(out, udp6(client, 40000, pod.addr.0, 8080, 63));
    let (_, back) = local.run(&udp6(pod.addr.0, 8080, client, 40000, 64));
    assert_eq!(back, udp6(vip, 80, client, 40000, 63));

    let mut cluster = gw_v6(vec![pod], vec![], TrafficPolicy::Cluster);
    let (_, out) = cluster.run(&udp6(client, 40000, vip, 80, 64));
    let (src, sport, _, _) = tuple(&out);
    assert_eq!(src, Addr::from_v6(v6("2001:db8::1")));
    assert_eq!(out, udp6(v6("2001:db8::1"), sport, pod.addr.0, 8080, 63));
}

#[test]
fn vlan_tag_is_kept_and_ipv4_options_are_handled() {
    let mut gw = Gw::new(&[Svc { external: TrafficPolicy::Local, ..Svc::default() }]);
    let tagged = |src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, ttl: u8| {
        let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW)
            .single_vlan(VlanId::try_new(42).unwrap())
            .ipv4(src, dst, ttl)
            .udp(sport, dport);
        let mut v = Vec::new();
        b.write(&mut v, PAYLOAD).unwrap();
        v
    };
    let (v, out) = gw.run(&tagged(CLIENT, 40000, LB, 80, 64));
    assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(POD_A) });
    assert_eq!(out, tagged(CLIENT, 40000, POD_A, 8080, 63));

    let with_options = |src: [u8; 4], dst: [u8; 4], ttl: u8| {
        let mut h = Ipv4Header::new(0, ttl, etherparse::ip_number::UDP, src, dst).unwrap();
        h.options = Ipv4Options::try_from(&[0x94, 0x04, 0, 0][..]).unwrap(); // Router Alert
        let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW)
            .ip(IpHeaders::Ipv4(h, Ipv4Extensions::default()))
            .udp(40001, 80);
        let mut v = Vec::new();
        b.write(&mut v, PAYLOAD).unwrap();
        v
    };
    let (v, out) = gw.run(&with_options(CLIENT, LB, 64));
    assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(POD_A) });
    // Destination port changes too: rebuild the expectation by hand.
    let mut want = with_options(CLIENT, POD_A, 63);
    let l4 = 14 + 24;
    want[l4 + 2..l4 + 4].copy_from_slice(&8080u16.to_be_bytes());
    want[l4 + 6..l4 + 8].copy_from_slice(&[0, 0]);
    let sum = checksum::sum(&want[l4..]) + checksum::pseudo_header(&CLIENT, &POD_A, 17, (want.len() - l4) as u32);
    want[l4 + 6..l4 + 8].copy_from_slice(&checksum::finish(sum).to_be_bytes());
    assert_eq!(out, want);
}

// ---------------------------------------------------------------- TTL, not ours, fragments

/// A Service's packet with TTL 1 is not forwarded (`ttl_expired`) and is
/// answered, as a router answers it, with ICMP time exceeded from the
/// gateway's address toward the sender, quoting the packet as received:
/// traceroute's first hop. Exact bytes (every checksum) against etherparse.
#[test]
fn ttl_one_is_answered_with_time_exceeded_and_counted() {
    let mut gw = Gw::new(&[Svc::default()]);
    let input = udp4(CLIENT, 40000, LB, 80, 1);
    let (v, out) = gw.run(&input);
    assert_eq!(v, Verdict::Reply);
    let b = PacketBuilder::ethernet2(MAC_GW, MAC_CLIENT)
        .ipv4(GW, CLIENT, 64)
        .icmpv4(etherparse::Icmpv4Type::TimeExceeded(etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit));
    let mut want = Vec::new();
    b.write(&mut want, &input[14..]).unwrap();
    assert_eq!(out, want, "time exceeded from the gateway quoting the datagram");
    assert!(matches!(gw.run(&udp4(CLIENT, 40000, LB, 80, 2)).0, Verdict::Forward { .. }));
    assert_eq!(gw.run(&udp4(CLIENT, 40000, LB, 80, 1)).0, Verdict::Reply, "a tracked flow's packet too");
    assert_eq!(gw.drops(DropReason::TtlExpired), 2);
    assert_eq!(gw.worker.counters.time_exceeded_sent, 2);

    let mut gw6 = gw_v6(vec![Endpoint { addr: Addr::from_v6(v6("2001:db8:1::10")), port: 8080, id: 5 }], vec![], {
        TrafficPolicy::Cluster
    });
    let input = udp6(v6("2001:db8::10"), 40000, v6("2001:db8:100::1"), 80, 1);
    let (v, out) = gw6.run(&input);
    assert_eq!(v, Verdict::Reply);
    let b = PacketBuilder::ethernet2(MAC_GW, MAC_CLIENT)
        .ipv6(v6("2001:db8::1"), v6("2001:db8::10"), 64)
        .icmpv6(etherparse::Icmpv6Type::TimeExceeded(etherparse::icmpv6::TimeExceededCode::HopLimitExceeded));
    let mut want = Vec::new();
    b.write(&mut want, &input[14..]).unwrap();
    assert_eq!(out, want, "hop limit exceeded from the gateway's IPv6 address");
}

/// At most [`ICMP_ERRORS_PER_SECOND`] time exceeded a second per worker:
/// past it the packets are only dropped, and the next second has a fresh
/// budget.
#[test]
fn time_exceeded_is_rate_limited() {
    use xskgate_fastpath::verdict::ICMP_ERRORS_PER_SECOND;
    let mut gw = Gw::new(&[Svc::default()]);
    let n = ICMP_ERRORS_PER_SECOND as usize + 10;
    let replies = (0..n).filter(|i| gw.run(&udp4(CLIENT, 1024 + *i as u16, LB, 80, 1)).0 == Verdict::Reply).count();
    assert_eq!(replies, ICMP_ERRORS_PER_SECOND as usize);
    assert_eq!(gw.drops(DropReason::TtlExpired), n as u64, "every one is a ttl_expired drop");
    gw.now += 1;
    assert_eq!(gw.run(&udp4(CLIENT, 50000, LB, 80, 1)).0, Verdict::Reply, "a new second");
}

#[test]
fn arp_and_fragments() {
    let mut gw = Gw::new(&[Svc::default()]);
    let mut arp = vec![0xff; 6];
    arp.extend_from_slice(&MAC_CLIENT);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&MAC_CLIENT);
    arp.extend_from_slice(&CLIENT);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&GW);
    assert_eq!(gw.run(&arp).0, Verdict::Pass);
    let mut frag = udp4(CLIENT, 40000, LB, 80, 64);
    frag[14 + 6] |= 0x20; // more fragments
    frag[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let c = checksum::finish(checksum::sum(&frag[14..34]));
    frag[14 + 10..14 + 12].copy_from_slice(&c.to_be_bytes());
    assert_eq!(gw.run(&frag).0, Verdict::Drop(DropReason::Fragment));
}

// ---------------------------------------------------------------- truncation

#[test]
fn every_truncation_of_every_input_is_a_counted_drop_or_a_pass_never_a_panic() {
    let inputs = vec![
        udp4(CLIENT, 40000, LB, 80, 64),
        tcp4_syn(CLIENT, 40000, LB, 80),
        udp6(v6("2001:db8::10"), 40000, v6("2001:db8:100::1"), 80, 64),
        {
            let b = PacketBuilder::ethernet2(MAC_CLIENT, MAC_GW)
                .ipv4(ROUTER, GW, 64)
                .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port));
            let mut e = Vec::new();
            b.write(&mut e, &udp4(GW, 30001, POD_A, 8080, 64)[14..42]).unwrap();
            e
        },
    ];
    for input in inputs {
        for len in 0..input.len() {
            let mut gw = Gw::new(&[Svc::default()]);
            let (v, out) = gw.run(&input[..len]);
            assert!(matches!(v, Verdict::Drop(DropReason::Malformed) | Verdict::Pass), "truncated to {len}: {v:?}");
            assert_eq!(out, &input[..len], "a truncated frame is never modified");
        }
    }
}

/// A batch decides its new flows before it stores any: a flow whose first
/// two packets share a batch is created once and both packets leave alike,
/// beside an established flow, a second new flow and a frame for the kernel.
#[test]
fn a_new_flow_twice_in_one_batch_is_created_once() {
    let mut gw = Gw::new(&[Svc::default()]);
    let (_, earlier) = gw.run(&udp4(CLIENT2, 41000, LB, 80, 64));
    let created = gw.worker.counters.flows_created;
    let arp = {
        let mut f = udp4(CLIENT, 1, LB, 2, 64);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f
    };
    let a = udp4(CLIENT, 40000, LB, 80, 64);
    let out = gw.run_batch(&[a.clone(), udp4(CLIENT2, 41000, LB, 80, 64), a, arp, udp4(CLIENT, 40001, LB, 80, 64)]);
    assert_eq!(gw.worker.counters.flows_created, created + 2, "two new flows, one of them seen twice");
    assert!(matches!(out[0].0, Verdict::Forward { .. }));
    assert_eq!(out[0], out[2], "both packets of the new flow translated alike");
    assert_eq!(out[1].1, earlier, "the established flow keeps its translation");
    assert_eq!(out[3].0, Verdict::Pass);
    assert!(matches!(out[4].0, Verdict::Forward { .. }));
    assert_ne!(tuple(&out[0].1).1, tuple(&out[4].1).1, "distinct SNAT ports");
    // The replies of the new flows find them.
    let (src, sport, dst, _) = tuple(&out[0].1);
    let (v, back) = gw.run(&udp4(v4(dst), 8080, v4(src), sport, 64));
    assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(CLIENT) });
    assert_eq!(back, udp4(LB, 80, CLIENT, 40000, 63));
    gw.conntrack.check_invariants().unwrap();
    assert_eq!(gw.conntrack.len(), 3);
}

/// The SNAT port allocator with four ports for one endpoint: flows started
/// in one batch (whose first ports may clash), then in a later batch (whose
/// first ports the batch sees taken beforehand) get distinct ports until
/// all four are used; the next new flow is a counted `snat_exhausted`
/// drop, in a batch and alone, and every stored flow's reply finds it.
#[test]
fn snat_ports_stay_unique_until_exhausted() {
    let svc = Svc { cluster: vec![ep(POD_A, 1)], local: vec![], ..Svc::default() };
    let mut gw = Gw::with_node(&[svc], NodeConfig { snat_ports: (30000, 30003), ..node() });
    let first: Vec<Vec<u8>> = (0..3).map(|i| udp4(CLIENT, 40000 + i, LB, 80, 64)).collect();
    let mut out = gw.run_batch(&first);
    out.extend(gw.run_batch(&[udp4(CLIENT, 40003, LB, 80, 64), udp4(CLIENT, 40004, LB, 80, 64)]));
    let forwarded: Vec<u16> =
        out.iter().filter(|(v, _)| matches!(v, Verdict::Forward { .. })).map(|(_, f)| tuple(f).1).collect();
    let mut ports = forwarded.clone();
    ports.sort_unstable();
    assert_eq!(ports, [30000, 30001, 30002, 30003], "every port once");
    assert_eq!(out[4].0, Verdict::Drop(DropReason::SnatExhausted));
    let (v, _) = gw.run(&udp4(CLIENT2, 40000, LB, 80, 64));
    assert_eq!(v, Verdict::Drop(DropReason::SnatExhausted));
    assert_eq!(gw.drops(DropReason::SnatExhausted), 2);
    // Each exhausted flow tried all four ports of the range, each taken.
    assert!(gw.worker.counters.snat_port_retries >= 2 * 4, "{}", gw.worker.counters.snat_port_retries);
    assert_eq!((gw.worker.counters.flows_created, gw.conntrack.len()), (4, 4));
    for (client_port, (_, frame)) in (40000..).zip(&out[..4]) {
        let (_, snat_port, _, _) = tuple(frame);
        let (v, back) = gw.run(&udp4(POD_A, 8080, GW, snat_port, 64));
        assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(CLIENT) });
        assert_eq!(back, udp4(LB, 80, CLIENT, client_port, 63));
    }
    gw.conntrack.check_invariants().unwrap();
}

/// With 95 % of one endpoint's SNAT ports in use, a new flow still finds a
/// free one within its tries: the search steps through the range by a
/// stride, so taken ports do not gather in runs longer than a search.
/// (Stepping by one port, 10 of these 950 flows were dropped as
/// `snat_exhausted`.)
#[test]
fn snat_ports_95_percent_used_drop_nothing() {
    let svc = Svc { cluster: vec![ep(POD_A, 1)], local: vec![], ..Svc::default() };
    let mut gw = Gw::with_node(&[svc], NodeConfig { snat_ports: (30000, 30999), ..node() });
    let frames: Vec<Vec<u8>> =
        (0..950u16).map(|i| udp4([198, 18, 7, (i % 200) as u8], 20000 + i, LB, 80, 64)).collect();
    for batch in frames.chunks(64) {
        gw.run_batch(batch);
    }
    assert_eq!(gw.drops(DropReason::SnatExhausted), 0);
    assert_eq!((gw.worker.counters.flows_created, gw.conntrack.len()), (950, 950));
    gw.conntrack.check_invariants().unwrap();
}

#[test]
fn process_single_frame_equals_batch() {
    let mut a = Gw::new(&[Svc { external: TrafficPolicy::Local, ..Svc::default() }]);
    let input = udp4(CLIENT, 40000, LB, 80, 64);
    let mut buf = vec![0u8; 2048];
    buf[..input.len()].copy_from_slice(&input);
    let t = Tables { services: &a.services, conntrack: &a.conntrack, affinity: &a.affinity };
    let mut f = Frame { buf: &mut buf, len: input.len() };
    let v = process(&mut f, &t, &mut a.worker, 100);
    assert_eq!(v, Verdict::Forward { next_hop: Addr::from_v4(POD_A) });
    assert_eq!(&buf[..input.len()], &udp4(CLIENT, 40000, POD_A, 8080, 63)[..]);
    // The drop reasons have unique stable names.
    let names: std::collections::HashSet<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
    assert_eq!(names.len(), DropReason::COUNT);
}

#[test]
fn udp_flow_to_a_removed_endpoint_is_flushed_and_moves_to_a_live_one() {
    let mut gw = Gw::new(&[Svc { cluster: vec![ep(POD_A, 1), ep(POD_B, 2)], ..Svc::default() }]);
    let (_, out) = gw.run(&udp4(CLIENT, 40000, LB, 80, 64));
    let first = tuple(&out).2;
    let (gone, live) =
        if first == Addr::from_v4(POD_A) { (ep(POD_A, 1), ep(POD_B, 2)) } else { (ep(POD_B, 2), ep(POD_A, 1)) };
    // The control plane publishes a table without the endpoint and flushes.
    gw.services = table(&[Svc { cluster: vec![live], local: vec![], ..Svc::default() }]);
    // Without the flush, conntrack would keep sending to the removed pod.
    assert_eq!(tuple(&gw.run(&udp4(CLIENT, 40000, LB, 80, 64)).1).2, gone.addr);
    assert_eq!(xskgate_fastpath::flush_udp_flows_to(&gw.conntrack, &gone), 1);
    let (v, out) = gw.run(&udp4(CLIENT, 40000, LB, 80, 64));
    assert_eq!(v, Verdict::Forward { next_hop: live.addr });
    assert_eq!(tuple(&out).2, live.addr, "the next datagram reaches a live endpoint");
    assert_eq!(xskgate_fastpath::flush_udp_flows_to(&gw.conntrack, &gone), 0);
}

// ---------------------------------------------------------------- direct server return

/// The outer header [`xskgate_fastpath::nat::encapsulate`] writes, built by
/// etherparse: IPv4 protocol 4 with DF, TTL 64, or IPv6 next header 41.
fn outer(src: Addr, dst: Addr, inner_len: usize) -> Vec<u8> {
    let mut v = Vec::new();
    match (src.as_v4(), dst.as_v4()) {
        (Some(s), Some(d)) => {
            let mut h = Ipv4Header::new(inner_len as u16, 64, etherparse::IpNumber(4), s, d).unwrap();
            h.dont_fragment = true;
            h.header_checksum = h.calc_header_checksum();
            h.write(&mut v).unwrap();
        }
        _ => {
            let h = etherparse::Ipv6Header {
                payload_length: inner_len as u16,
                next_header: etherparse::IpNumber(41),
                hop_limit: 64,
                source: src.0,
                destination: dst.0,
                ..Default::default()
            };
            h.write(&mut v).unwrap();
        }
    }
    v
}

/// A DSR Service's external packet to its LoadBalancer IP leaves as the
/// client sent it (TTL less one) inside IPIP from the gateway to the
/// Maglev-picked endpoint; nothing is stored, and the next packet of the
/// flow picks the same endpoint. A NodePort packet and internal traffic of
/// the same Service are masqueraded as before.
#[test]
fn dsr_encapsulates_the_clients_packet_to_the_endpoint() {
    let mut gw = Gw::new(&[Svc { dsr: true, ..Svc::default() }]);
    let (v, out) = gw.run(&udp4(CLIENT, 40000, LB, 80, 64));
    let Verdict::Forward { next_hop } = v else { panic!("{v:?}") };
    assert!([POD_A, POD_B].contains(&next_hop.as_v4().unwrap()), "{next_hop}");
    let inner = udp4(CLIENT, 40000, LB, 80, 63);
    let mut want = inner[..14].to_vec();
    want.extend(outer(Addr::from_v4(GW), next_hop, inner.len() - 14));
    want.extend_from_slice(&inner[14..]);
    assert_eq!(out, want, "exact bytes: the outer header, then the packet as the client sent it");
    assert_eq!(gw.conntrack.len(), 0, "nothing stored");
    let (again, _) = gw.run(&udp4(CLIENT, 40000, LB, 80, 64));
    assert_eq!(again, v, "the same endpoint for the flow's next packet");
    let (v, out) = gw.run(&udp4(CLIENT, 40001, GW, NODE_PORT, 64));
    assert!(matches!(v, Verdict::Forward { .. }));
    assert_eq!(tuple(&out).0, Addr::from_v4(GW), "a NodePort is masqueraded");
    assert_eq!(gw.worker.counters.service(10).packets, 3, "DSR packets count for the Service too");
}

#[test]
fn dsr_over_ipv6_is_ip6ip6() {
    let pod = Endpoint { addr: Addr::from_v6(v6("2001:db8:1::10")), port: 80, id: 5 };
    let mut gw = gw_v6(vec![pod], vec![], TrafficPolicy::Cluster);
    let mut b = ServiceTableBuilder::new(node(), 2);
    for p in gw.services.ports() {
        b.add(Arc::new(ServicePort { dsr: true, ..(**p).clone() })).unwrap();
    }
    gw.services = b.build();
    let (client, vip) = (v6("2001:db8::10"), v6("2001:db8:100::1"));
    let (v, out) = gw.run(&udp6(client, 40000, vip, 80, 64));
    assert_eq!(v, Verdict::Forward { next_hop: pod.addr });
    let inner = udp6(client, 40000, vip, 80, 63);
    let mut want = inner[..14].to_vec();
    want.extend(outer(Addr::from_v6(v6("2001:db8::1")), pod.addr, inner.len() - 14));
    want.extend_from_slice(&inner[14..]);
    assert_eq!(out, want);
}
