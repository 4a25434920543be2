//! What the fuzz targets share: the fixed service table the `pipeline`
//! target runs frames against, how an input becomes frames, and the
//! checksum check (etherparse's full recomputation, independent of
//! xskgate's incremental updates).

use std::sync::Arc;
use xskgate_conntrack::{Addr, Proto};
use xskgate_fastpath::{
    Endpoint, EndpointSet, Frontend, FrontendKind, NodeConfig, ServicePort, ServicePortName, ServiceTable,
    ServiceTableBuilder, TrafficPolicy,
};

/// Room each frame has in its buffer (an AF_XDP frame holds 2048 bytes
/// before its headroom).
pub const BUFFER: usize = 2048;

fn v6(s: &str) -> Addr {
    Addr::from_v6(s.parse::<std::net::Ipv6Addr>().expect("literal").octets())
}

/// The gateway 198.18.0.1 / 2001:db8::1, pods in 198.19.0.0/17 and
/// 2001:db8:1::/48, and Services of every kind the pipeline decides:
/// Cluster and Local over TCP and UDP (LoadBalancer 198.18.100.x:80,
/// ClusterIP 198.19.128.x:80, NodePort 3008x), one with ClientIP affinity,
/// one with loadBalancerSourceRanges, one without endpoints (rejects), and
/// an IPv6 LoadBalancer 2001:db8:100::1:80.
pub fn table() -> ServiceTable {
    let gw = Addr::from_v4([198, 18, 0, 1]);
    let node = NodeConfig {
        addresses: vec![gw, v6("2001:db8::1")],
        pod_cidrs: vec!["198.19.0.0/17".parse().expect("literal"), "2001:db8:1::/48".parse().expect("literal")],
        snat_v4: Some(gw),
        snat_v6: Some(v6("2001:db8::1")),
        snat_ports: (30000, 30063),
        ..NodeConfig::default()
    };
    let ep = |a: [u8; 4], id| Endpoint { addr: Addr::from_v4(a), port: 8080, id };
    let (a, b) = (ep([198, 19, 1, 10], 1), ep([198, 19, 2, 10], 2));
    let mut builder = ServiceTableBuilder::new(node, 1);
    let cases: [(u32, Proto, TrafficPolicy, Vec<Endpoint>, Vec<Endpoint>, Option<u32>, Vec<&str>); 6] = [
        (1, Proto::UDP, TrafficPolicy::Cluster, vec![a, b], vec![a], None, vec![]),
        (2, Proto::TCP, TrafficPolicy::Local, vec![a, b], vec![a], None, vec![]),
        (3, Proto::TCP, TrafficPolicy::Local, vec![b], vec![], None, vec![]),
        (4, Proto::UDP, TrafficPolicy::Cluster, vec![a, b], vec![a], Some(10), vec![]),
        (5, Proto::TCP, TrafficPolicy::Cluster, vec![a], vec![a], None, vec!["198.18.0.0/24"]),
        (6, Proto::UDP, TrafficPolicy::Cluster, vec![], vec![], None, vec![]),
    ];
    for (id, proto, policy, cluster, local, affinity, ranges) in cases {
        let i = id as u8;
        builder
            .add(Arc::new(ServicePort {
                id,
                name: ServicePortName { namespace: "fuzz".into(), name: format!("s{id}"), port_name: String::new() },
                proto,
                frontends: vec![
                    Frontend { kind: FrontendKind::LoadBalancer, addr: Addr::from_v4([198, 18, 100, i]), port: 80 },
                    Frontend { kind: FrontendKind::ClusterIp, addr: Addr::from_v4([198, 19, 128, i]), port: 80 },
                    Frontend {
                        kind: FrontendKind::NodePort,
                        addr: Addr::from_v4([0, 0, 0, 0]),
                        port: 30080 + id as u16,
                    },
                ],
                external_policy: policy,
                internal_policy: TrafficPolicy::Cluster,
                cluster: EndpointSet::new(cluster),
                local: EndpointSet::new(local),
                affinity_timeout: affinity,
                source_ranges: ranges.iter().map(|r| r.parse().expect("literal")).collect(),
                health_check_node_port: None,
                // One Service by direct server return (with affinity).
                dsr: id == 4,
            }))
            .expect("distinct frontends");
    }
    let pod6 = Endpoint { addr: v6("2001:db8:1::10"), port: 8080, id: 7 };
    builder
        .add(Arc::new(ServicePort {
            id: 7,
            name: ServicePortName { namespace: "fuzz".into(), name: "v6".into(), port_name: String::new() },
            proto: Proto::UDP,
            frontends: vec![Frontend { kind: FrontendKind::LoadBalancer, addr: v6("2001:db8:100::1"), port: 80 }],
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            cluster: EndpointSet::new(vec![pod6]),
            local: EndpointSet::new(vec![pod6]),
            affinity_timeout: None,
            source_ranges: vec![],
            health_check_node_port: None,
            dsr: false,
        }))
        .expect("distinct frontends");
    builder.build()
}

/// An input as up to 16 frames: each a little-endian `u16` length (cut to
/// what is left and to [`BUFFER`]) and that many bytes.
pub fn frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while data.len() >= 2 && out.len() < 16 {
        let len = usize::from(u16::from_le_bytes([data[0], data[1]])).min(data.len() - 2).min(BUFFER);
        out.push(&data[2..2 + len]);
        data = &data[2 + len..];
    }
    out
}

/// Whether a TCP or UDP frame's IPv4 header checksum (if IPv4) and its
/// TCP/UDP checksum are right, recomputed in full by etherparse; `None`
/// when the frame has no such checksums to check (not TCP or UDP, not
/// parsable by etherparse, a UDP/IPv4 checksum of 0, which means none).
pub fn checksums_ok(frame: &[u8]) -> Option<bool> {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let sliced = SlicedPacket::from_ethernet(frame).ok()?;
    match (&sliced.net, &sliced.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(t)) => {
            let h = ip.header();
            if h.is_fragmenting_payload() {
                return None;
            }
            let header = h.to_header().calc_header_checksum() == h.header_checksum();
            let l4 = match t {
                TransportSlice::Tcp(tcp) => tcp.calc_checksum_ipv4(h.source(), h.destination()).ok()? == tcp.checksum(),
                TransportSlice::Udp(udp) if udp.checksum() == 0 => true,
                TransportSlice::Udp(udp) => {
                    let sum =
                        udp.to_header().calc_checksum_ipv4_raw(h.source(), h.destination(), udp.payload()).ok()?;
                    sum == udp.checksum()
                }
                _ => return None,
            };
            Some(header && l4)
        }
        (Some(NetSlice::Ipv6(ip)), Some(t)) => {
            let h = ip.header();
            match t {
                TransportSlice::Tcp(tcp) => {
                    Some(tcp.calc_checksum_ipv6(h.source(), h.destination()).ok()? == tcp.checksum())
                }
                TransportSlice::Udp(udp) => {
                    let sum =
                        udp.to_header().calc_checksum_ipv6_raw(h.source(), h.destination(), udp.payload()).ok()?;
                    Some(sum == udp.checksum())
                }
                _ => None,
            }
        }
        _ => None,
    }
}
