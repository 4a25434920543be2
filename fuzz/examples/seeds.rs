//! Writes the seed corpora (`fuzz/seeds/parse`, `fuzz/seeds/pipeline`):
//! frames of the golden cases' shapes, built by etherparse, against the
//! fuzz table's Services. `cargo +nightly run --example seeds` in `fuzz/`.

use etherparse::{PacketBuilder, icmpv4::DestUnreachableHeader};

const CLIENT: [u8; 4] = [198, 18, 0, 10];
const POD_A: [u8; 4] = [198, 19, 1, 10];
const MAC_C: [u8; 6] = [2, 0, 0, 0, 0, 0x0a];
const MAC_G: [u8; 6] = [2, 0, 0, 0, 0, 0x01];

fn v6(s: &str) -> [u8; 16] {
    s.parse::<std::net::Ipv6Addr>().unwrap().octets()
}

fn main() {
    let udp = |src: [u8; 4], sport, dst: [u8; 4], dport| {
        let mut v = Vec::new();
        PacketBuilder::ethernet2(MAC_C, MAC_G).ipv4(src, dst, 64).udp(sport, dport).write(&mut v, b"who").unwrap();
        v
    };
    let tcp = |src: [u8; 4], sport, dst: [u8; 4], dport, syn: bool| {
        let mut v = Vec::new();
        let b = PacketBuilder::ethernet2(MAC_C, MAC_G).ipv4(src, dst, 64).tcp(sport, dport, 1000, 64240);
        if syn { b.syn().write(&mut v, &[]) } else { b.ack(1).write(&mut v, b"GET /") }.unwrap();
        v
    };
    let mut udp6 = Vec::new();
    PacketBuilder::ethernet2(MAC_C, MAC_G)
        .ipv6(v6("2001:db8::10"), v6("2001:db8:100::1"), 64)
        .udp(40000, 80)
        .write(&mut udp6, b"who")
        .unwrap();
    let mut echo = Vec::new();
    PacketBuilder::ethernet2(MAC_C, MAC_G)
        .ipv4(CLIENT, [198, 18, 100, 2], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut echo, b"ping")
        .unwrap();
    // An ICMP fragmentation-needed from a router about the client's flow
    // after NAT (198.18.0.1:30000 > 198.19.1.10:8080).
    let inner = udp([198, 18, 0, 1], 30000, POD_A, 8080);
    let mut frag_needed = Vec::new();
    PacketBuilder::ethernet2(MAC_C, MAC_G)
        .ipv4([198, 18, 50, 1], [198, 18, 0, 1], 64)
        .icmpv4(etherparse::Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
            next_hop_mtu: 1400,
        }))
        .write(&mut frag_needed, &inner[14..])
        .unwrap();
    let mut vlan = Vec::new();
    PacketBuilder::ethernet2(MAC_C, MAC_G)
        .single_vlan(etherparse::VlanId::try_new(7).unwrap())
        .ipv4(CLIENT, [198, 18, 100, 1], 64)
        .udp(40001, 80)
        .write(&mut vlan, b"who")
        .unwrap();
    let arp = [vec![0xff; 6], MAC_C.to_vec(), vec![0x08, 0x06], vec![0; 28]].concat();
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("udp-cluster", udp(CLIENT, 40000, [198, 18, 100, 1], 80)),
        ("tcp-local-syn", tcp(CLIENT, 40000, [198, 18, 100, 2], 80, true)),
        ("tcp-local-ack", tcp(CLIENT, 40000, [198, 18, 100, 2], 80, false)),
        ("tcp-reply", tcp(POD_A, 8080, CLIENT, 40000, false)),
        ("tcp-no-local", tcp(CLIENT, 40002, [198, 18, 100, 3], 80, true)),
        ("udp-affinity", udp(CLIENT, 40003, [198, 18, 100, 4], 80)),
        ("tcp-source-range", tcp([203, 0, 113, 9], 40004, [198, 18, 100, 5], 80, true)),
        ("udp-reject", udp(CLIENT, 40005, [198, 18, 100, 6], 80)),
        ("udp-nodeport", udp(CLIENT, 40006, [198, 18, 0, 1], 30081)),
        ("udp-clusterip-from-pod", udp([198, 19, 2, 10], 40007, [198, 19, 128, 1], 80)),
        ("udp6", udp6),
        ("echo", echo),
        ("icmp-frag-needed", frag_needed),
        ("vlan", vlan),
        ("arp", arp),
    ];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    for target in ["parse", "pipeline"] {
        std::fs::create_dir_all(root.join(target)).unwrap();
    }
    let framed = |fs: &[&Vec<u8>]| -> Vec<u8> {
        fs.iter().flat_map(|f| [(f.len() as u16).to_le_bytes().to_vec(), f.to_vec()].concat()).collect()
    };
    for (name, f) in &frames {
        std::fs::write(root.join("parse").join(name), f).unwrap();
        std::fs::write(root.join("pipeline").join(name), framed(&[f])).unwrap();
    }
    // A flow and its reply in one batch, and a whole mixed batch.
    let by = |n: &str| &frames.iter().find(|(name, _)| *name == n).unwrap().1;
    std::fs::write(root.join("pipeline").join("local-flow-and-reply"), framed(&[by("tcp-local-syn"), by("tcp-reply")]))
        .unwrap();
    let all: Vec<&Vec<u8>> = frames.iter().map(|(_, f)| f).collect();
    std::fs::write(root.join("pipeline").join("mixed-batch"), framed(&all)).unwrap();
}
