//! Parsing at the boundary: a frame becomes a [`Parsed`] view of offsets and
//! header fields, or an [`Unparsed`] reason.
//!
//! Two parsers give the same answer. [`parse`] first tries a direct reading
//! of the shape nearly all traffic has (Ethernet II, IPv4 without options or
//! IPv6 without extension headers, unfragmented, TCP or UDP) and accepts the
//! frame only when every length in it is consistent; anything else, valid or
//! not, goes to [`parse_general`]. A differential property test
//! (`tests/robust.rs`) holds the two to the same result on valid, mutated
//! and truncated frames.
//!
//! In [`parse_general`], etherparse validates the frame (Ethernet II, optional 802.1Q / QinQ tags,
//! IPv4 with options, IPv6 with extension headers skipped, TCP, UDP, ICMP,
//! ICMPv6) without copying; we keep the byte offsets so the pipeline can
//! rewrite the frame in place. Once `parse` returned `Ok`, every offset in
//! `Parsed` lies inside the frame and the fixed-size fields the pipeline
//! rewrites (addresses, ports, checksums, TTL) are present: no later access
//! panics. Anything truncated or inconsistent is [`Unparsed::Malformed`].
//! Zero-copy; allocates nothing.

use etherparse::{LaxIpSlice, NetSlice, SlicedPacket, TransportSlice};
use xskgate_conntrack::{Addr, Proto};

/// Why a frame has no [`Parsed`] view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unparsed {
    /// Not IP (ARP, LLDP, ...): the kernel's business.
    NotIp,
    /// Truncated or inconsistent headers.
    Malformed,
    /// An IP fragment: ports are not in every fragment, so it cannot be
    /// matched to a flow.
    Fragment,
}

/// Layer-4 shape of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
    /// ICMP / ICMPv6 error (destination unreachable, fragmentation needed /
    /// packet too big, time exceeded, parameter problem); [`icmp_inner`]
    /// reads the TCP or UDP packet it quotes, if it quotes one.
    IcmpError,
    /// ICMP echo request (type 8) or ICMPv6 echo request (type 128): a
    /// ping, answered for a served VIP (`ServiceTable::echo`).
    EchoRequest,
    /// Anything else (other ICMP, other protocols): never a service frontend.
    Other,
}

/// The packet embedded in an ICMP error (usually truncated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Inner {
    pub l3: usize,
    pub l4: usize,
    pub v6: bool,
    pub proto: Proto,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
}

/// Offsets and fields of a parsed IP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the layer-4 header.
    pub l4: usize,
    /// End of the IP packet (by its length field; Ethernet padding excluded).
    pub end: usize,
    pub v6: bool,
    pub proto: Proto,
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    /// TTL or hop limit.
    pub ttl: u8,
    /// TCP flags byte (0 for other protocols).
    pub tcp_flags: u8,
    pub l4_kind: L4,
}

fn offset(frame: &[u8], part: &[u8]) -> usize {
    part.as_ptr() as usize - frame.as_ptr() as usize
}

fn ports(l4: &[u8]) -> Option<(u16, u16)> {
    match l4 {
        [a, b, c, d, ..] => Some((u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d]))),
        _ => None,
    }
}

/// Parses a frame that starts with an Ethernet II header.
///
/// # Errors
/// [`Unparsed`] says why the frame cannot be handled as an IP flow.
#[inline]
pub fn parse(frame: &[u8]) -> Result<Parsed, Unparsed> {
    match parse_common(frame) {
        Some(p) => Ok(p),
        None => parse_general(frame),
    }
}

#[inline]
fn be16(b: &[u8], at: usize) -> usize {
    usize::from(u16::from_be_bytes([b[at], b[at + 1]]))
}

/// The common shape read directly: `Some` only for a consistent,
/// unfragmented TCP or UDP packet in IPv4 without options or IPv6 without
/// extension headers, straight after an untagged Ethernet header. Every
/// other frame (tagged, with options, ICMP, fragmented, or inconsistent in
/// any length) is `None`, for [`parse_general`] to decide: `parse` is this,
/// then that. Public so that a batch can use the fields while they are in
/// registers (reading them back from where it stored them stalls on store
/// forwarding).
#[inline(always)]
pub fn parse_common(frame: &[u8]) -> Option<Parsed> {
    const L3: usize = 14;
    let (v6, l4, end, next, src, dst, ttl) = match frame.get(12..14)? {
        [0x08, 0x00] => {
            let ip: &[u8; 20] = frame.get(L3..L3 + 20)?.try_into().ok()?;
            let total = be16(ip, 2);
            // Version 4 with a 5-word header; MF clear and offset zero.
            if ip[0] != 0x45 || total < 20 || L3 + total > frame.len() || be16(ip, 6) & 0x3fff != 0 {
                return None;
            }
            let src = Addr::from_v4([ip[12], ip[13], ip[14], ip[15]]);
            let dst = Addr::from_v4([ip[16], ip[17], ip[18], ip[19]]);
            (false, L3 + 20, L3 + total, ip[9], src, dst, ip[8])
        }
        [0x86, 0xdd] => {
            let ip: &[u8; 40] = frame.get(L3..L3 + 40)?.try_into().ok()?;
            let payload = be16(ip, 4);
            // Version 6; a zero payload length (a jumbogram) is left to etherparse.
            if ip[0] >> 4 != 6 || payload == 0 || L3 + 40 + payload > frame.len() {
                return None;
            }
            let src = Addr::from_v6(ip[8..24].try_into().ok()?);
            let dst = Addr::from_v6(ip[24..40].try_into().ok()?);
            (true, L3 + 40, L3 + 40 + payload, ip[6], src, dst, ip[7])
        }
        _ => return None,
    };
    let seg = frame.get(l4..end)?;
    let (proto, l4_kind, tcp_flags) = match next {
        6 => {
            let data_offset = usize::from(*seg.get(12)? >> 4) * 4;
            if data_offset < 20 || data_offset > seg.len() {
                return None;
            }
            (Proto::TCP, L4::Tcp, seg[13])
        }
        17 => {
            let len = be16(seg.get(..8)?, 4);
            if len < 8 || len > seg.len() {
                return None;
            }
            (Proto::UDP, L4::Udp, 0)
        }
        _ => return None,
    };
    Some(Parsed {
        l3: L3,
        l4,
        end,
        v6,
        proto,
        src,
        dst,
        sport: be16(seg, 0) as u16,
        dport: be16(seg, 2) as u16,
        ttl,
        tcp_flags,
        l4_kind,
    })
}

/// The general parser (etherparse): every shape [`parse`] supports. Public
/// so that tests can hold [`parse`]'s direct reading of the common shape to
/// it.
///
/// # Errors
/// As [`parse`].
#[inline(never)]
pub fn parse_general(frame: &[u8]) -> Result<Parsed, Unparsed> {
    let sliced = SlicedPacket::from_ethernet(frame).map_err(|_| Unparsed::Malformed)?;
    let (l3, v6, src, dst, ttl, end, fragmented) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            let l3 = offset(frame, h.slice());
            let end = l3 + usize::from(h.total_len());
            let src = Addr::from_v4(h.source());
            (l3, false, src, Addr::from_v4(h.destination()), h.ttl(), end, ip.is_payload_fragmented())
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            let l3 = offset(frame, h.slice());
            let end = l3 + 40 + usize::from(h.payload_length());
            let src = Addr::from_v6(h.source());
            (l3, true, src, Addr::from_v6(h.destination()), h.hop_limit(), end, ip.is_payload_fragmented())
        }
        Some(NetSlice::Arp(_)) | None => return Err(Unparsed::NotIp),
    };
    if fragmented {
        return Err(Unparsed::Fragment);
    }
    if end > frame.len() {
        return Err(Unparsed::Malformed);
    }
    let mut p = Parsed {
        l3,
        l4: end,
        end,
        v6,
        proto: Proto(0),
        src,
        dst,
        sport: 0,
        dport: 0,
        ttl,
        tcp_flags: 0,
        l4_kind: L4::Other,
    };
    match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let s = t.slice();
            p.l4 = offset(frame, s);
            p.proto = Proto::TCP;
            (p.sport, p.dport) = (t.source_port(), t.destination_port());
            p.tcp_flags = s[13];
            p.l4_kind = L4::Tcp;
        }
        Some(TransportSlice::Udp(u)) => {
            p.l4 = offset(frame, u.slice());
            p.proto = Proto::UDP;
            (p.sport, p.dport) = (u.source_port(), u.destination_port());
            p.l4_kind = L4::Udp;
        }
        Some(TransportSlice::Icmpv4(i)) => {
            let s = i.slice();
            p.l4 = offset(frame, s);
            p.proto = Proto::ICMP;
            if matches!(s[0], 3 | 11 | 12) {
                p.l4_kind = L4::IcmpError;
            } else if s[0] == 8 && s[1] == 0 {
                p.l4_kind = L4::EchoRequest;
            }
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let s = i.slice();
            p.l4 = offset(frame, s);
            p.proto = Proto::ICMPV6;
            if matches!(s[0], 1..=4) {
                p.l4_kind = L4::IcmpError;
            } else if s[0] == 128 && s[1] == 0 {
                p.l4_kind = L4::EchoRequest;
            }
        }
        _ => {
            if let Some(NetSlice::Ipv4(ip)) = &sliced.net {
                p.proto = Proto(ip.payload_ip_number().0);
            } else if let Some(NetSlice::Ipv6(ip)) = &sliced.net {
                p.proto = Proto(ip.payload().ip_number.0);
            }
        }
    }
    // The transport header lies inside the IP payload (etherparse reads an
    // IPv6 payload length of 0, a jumbogram's, as "to the end of the frame").
    let header = match p.l4_kind {
        L4::Tcp => 20,
        L4::Udp | L4::IcmpError | L4::EchoRequest => 8,
        L4::Other => 0,
    };
    if p.l4 + header > p.end {
        return Err(Unparsed::Malformed);
    }
    Ok(p)
}

/// The packet quoted by a frame that [`parse`] classified as
/// [`L4::IcmpError`] (read on demand, so that the common [`Parsed`]
/// stays small). `None` for any other frame.
pub fn icmp_inner(frame: &[u8], p: &Parsed) -> Option<Inner> {
    if p.l4_kind != L4::IcmpError {
        return None;
    }
    // Both ICMP error headers are 8 bytes, then the quote.
    inner(frame, frame.get(p.l4 + 8..p.end)?)
}

/// The embedded packet of an ICMP error, if its addresses and ports are
/// there (TCP or UDP only: errors about anything else are not ours).
fn inner(frame: &[u8], payload: &[u8]) -> Option<Inner> {
    let (ip, _) = LaxIpSlice::from_slice(payload).ok()?;
    let (l3, v6, src, dst, transport, proto) = match &ip {
        LaxIpSlice::Ipv4(s) => {
            let h = s.header();
            let pl = s.payload();
            (
                offset(frame, h.slice()),
                false,
                Addr::from_v4(h.source()),
                Addr::from_v4(h.destination()),
                pl.payload,
                pl.ip_number,
            )
        }
        LaxIpSlice::Ipv6(s) => {
            let h = s.header();
            let pl = s.payload();
            (
                offset(frame, h.slice()),
                true,
                Addr::from_v6(h.source()),
                Addr::from_v6(h.destination()),
                pl.payload,
                pl.ip_number,
            )
        }
    };
    let proto = Proto(proto.0);
    if proto != Proto::TCP && proto != Proto::UDP {
        return None;
    }
    let (sport, dport) = ports(transport)?;
    Some(Inner { l3, l4: offset(frame, transport), v6, proto, src, dst, sport, dport })
}
