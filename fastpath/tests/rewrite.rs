//! `nat::rewrite`, the per-packet rewrite of every tracked flow, against
//! full recomputation: for random tuples, TTLs and payloads (IPv4 with and
//! without options, IPv6; TCP and UDP; an IPv4 UDP checksum of zero; some
//! fields left unchanged by the NAT), the rewritten frame equals the frame
//! etherparse builds from scratch with the new tuple and the TTL one lower,
//! checksums included.
//!
//! The translation comes from a real conntrack table, in both directions of
//! the flow, so the checksum deltas the table computes when it stores a
//! flow are checked too.

use etherparse::{IpHeaders, Ipv4Header, Ipv4Options, PacketBuilder, TcpHeader};
use proptest::prelude::*;
use xskgate_conntrack::{Addr, Config, FlowKey, FlowState, FlowTable, NewFlow, Proto};
use xskgate_fastpath::{nat, wire};

const MACS: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);

#[derive(Clone, Copy, Debug)]
struct Tuple {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
}

/// A frame of `t` (only the last 4 address bytes in IPv4).
fn frame(v6: bool, tcp: bool, options: bool, t: &Tuple, ttl: u8, payload: &[u8]) -> Vec<u8> {
    let v4 = |a: &[u8; 16]| [a[12], a[13], a[14], a[15]];
    let ip = if v6 {
        PacketBuilder::ethernet2(MACS.0, MACS.1).ipv6(t.src, t.dst, ttl)
    } else {
        let mut h = Ipv4Header::new(0, ttl, etherparse::IpNumber(0), v4(&t.src), v4(&t.dst)).unwrap();
        if options {
            h.options = Ipv4Options::try_from(&[0x94, 0x04, 0, 0][..]).unwrap(); // Router Alert
        }
        PacketBuilder::ethernet2(MACS.0, MACS.1).ip(IpHeaders::Ipv4(h, Default::default()))
    };
    let mut v = Vec::new();
    if tcp {
        let mut h = TcpHeader::new(t.sport, t.dport, 7, 1000);
        h.ack = true;
        h.acknowledgment_number = 9;
        ip.tcp_header(h).write(&mut v, payload).unwrap();
    } else {
        ip.udp(t.sport, t.dport).write(&mut v, payload).unwrap();
    }
    v
}

fn tuple() -> impl Strategy<Value = Tuple> {
    (any::<[u8; 16]>(), any::<[u8; 16]>(), any::<u16>(), any::<u16>()).prop_map(|(src, dst, sport, dport)| Tuple {
        src,
        dst,
        sport,
        dport,
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    #[allow(clippy::too_many_arguments)]
    fn rewrite_equals_full_recomputation(
        v6 in any::<bool>(),
        tcp in any::<bool>(),
        options in any::<bool>(),
        zero_udp_checksum in any::<bool>(),
        reply_direction in any::<bool>(),
        from in tuple(),
        to in tuple(),
        keep in any::<[bool; 3]>(),
        ttl in 2u8..=255,
        payload in prop::collection::vec(any::<u8>(), 0..40),
    ) {
        let options = options && !v6;
        // Some NATs leave fields as they are (DNAT only, a kept port).
        let mut to = to;
        if keep[0] { to.src = from.src; }
        if keep[1] { to.dst = from.dst; }
        if keep[2] { (to.sport, to.dport) = (from.sport, from.dport); }
        let addr = |a: [u8; 16]| if v6 { Addr::from_v6(a) } else { Addr::from_v4([a[12], a[13], a[14], a[15]]) };
        let proto = if tcp { Proto::TCP } else { Proto::UDP };
        let key = |t: &Tuple| FlowKey { proto, src: addr(t.src), dst: addr(t.dst), sport: t.sport, dport: t.dport };
        // The flow: packets carrying `from` become `to`; so its replies
        // carry `to` reversed and become `from` reversed.
        let flow = NewFlow { orig: key(&from), reply: key(&to).reversed(), backend: 1, service: 2, state: FlowState::Udp { replied: false } };
        let table = FlowTable::new(Config { capacity: 4, ..Config::default() }).unwrap();
        prop_assume!(table.insert(&flow, 0).is_ok());
        let (carried, becomes) = if reply_direction {
            let rev = |t: &Tuple| Tuple { src: t.dst, dst: t.src, sport: t.dport, dport: t.sport };
            (rev(&to), rev(&from))
        } else {
            (from, to)
        };
        let mut input = frame(v6, tcp, options, &carried, ttl, &payload);
        let mut want = frame(v6, tcp, options, &becomes, ttl - 1, &payload);
        let p = wire::parse(&input).unwrap();
        if zero_udp_checksum && !tcp && !v6 {
            // "No checksum" stays none after NAT.
            let at = p.l4 + 6;
            input[at..at + 2].copy_from_slice(&[0, 0]);
            want[at..at + 2].copy_from_slice(&[0, 0]);
        }
        let view = table.lookup(&key(&carried)).unwrap();
        prop_assert_eq!(view.rewrite(), key(&becomes));
        nat::rewrite(&mut input, &p, &view);
        prop_assert_eq!(input, want);
    }
}
