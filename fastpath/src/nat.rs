//! In-place rewriting of a parsed frame: address/port translation with
//! incremental checksums (RFC 1624), ICMP error translation (outer and
//! embedded headers), and the rejects generated in place (TCP RST, ICMP
//! port unreachable).
//!
//! Every function takes a frame that [`crate::wire::parse`] accepted and the
//! [`Parsed`] view it returned; all offsets used were bounds-checked there,
//! and the few optional fields (an embedded L4 checksum beyond a truncated
//! quote) are checked here. Nothing panics, nothing allocates.

use crate::checksum::{self, Incremental};
use crate::wire::{Inner, Parsed};
use xskgate_conntrack::{Addr, FlowKey, FlowView, Proto, tcp_flags};

#[inline]
fn get16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The bytes of an address as the packet carries it (4 or 16).
#[inline]
fn addr_bytes(a: &Addr, v6: bool) -> &[u8] {
    if v6 { &a.0 } else { &a.0[12..] }
}

/// Field offsets of an IP header at `l3`: (source, destination, length).
#[inline]
fn addr_offsets(l3: usize, v6: bool) -> (usize, usize, usize) {
    if v6 { (l3 + 8, l3 + 24, 16) } else { (l3 + 12, l3 + 16, 4) }
}

/// Offset of the L4 checksum of `proto` at `l4`, if the protocol has one
/// that covers the pseudo-header and it lies within `end`.
#[inline]
fn l4_checksum_at(proto: Proto, l4: usize, end: usize) -> Option<usize> {
    let at = match proto {
        Proto::TCP => l4 + 16,
        Proto::UDP => l4 + 6,
        _ => return None,
    };
    (at + 2 <= end).then_some(at)
}

/// Writes new addresses and ports into the IP/L4 headers at `l3`/`l4`,
/// updating the L4 checksum (if within `end`) incrementally, and returns
/// the IPv4 header checksum update for the caller to finish.
#[inline]
fn translate(buf: &mut [u8], l3: usize, l4: usize, end: usize, v6: bool, proto: Proto, to: &FlowKey) -> Incremental {
    let ports = ports_of(to);
    if v6 {
        translate_n::<16>(buf, l3, l4, end, proto, &to.src.0, &to.dst.0, &ports)
    } else {
        translate_n::<4>(buf, l3, l4, end, proto, &octets_v4(&to.src), &octets_v4(&to.dst), &ports)
    }
}

/// The 4 bytes of an IPv4 address.
#[inline(always)]
fn octets_v4(a: &Addr) -> [u8; 4] {
    let [.., a, b, c, d] = a.0;
    [a, b, c, d]
}

/// Source and destination port as the L4 header carries them.
#[inline(always)]
fn ports_of(to: &FlowKey) -> [u8; 4] {
    ((u32::from(to.sport) << 16) | u32::from(to.dport)).to_be_bytes()
}

/// The one's-complement sum of the 16-bit words of a field of `N` bytes
/// (4 or 16), read as 32-bit words so that it compiles to a few adds.
#[inline(always)]
fn word_sum<const N: usize>(b: &[u8; N]) -> u64 {
    let mut acc = 0u64;
    for c in b.chunks_exact(4) {
        let w = u32::from_be_bytes([c[0], c[1], c[2], c[3]]);
        acc += u64::from(w >> 16) + u64::from(w & 0xffff);
    }
    acc
}

/// Writes `new` over the field `old` and returns the checksum delta of the
/// change (RFC 1624's `~m + m'` over its words; 0 when the field does not
/// change, so an unchanged field leaves checksums as they are).
#[inline(always)]
fn replace<const N: usize>(old: &mut [u8; N], new: &[u8; N]) -> u64 {
    if old == new {
        return 0;
    }
    // ~m summed over N/2 words is N/2 * 0xffff - sum(m), never negative.
    let delta = (N as u64 / 2) * 0xffff - word_sum(old) + word_sum(new);
    *old = *new;
    delta
}

/// [`replace`] for the `N` bytes of `buf` at `at` (0 if they are not there,
/// which parse() rules out for every field this module rewrites).
#[inline(always)]
fn replace_at<const N: usize>(buf: &mut [u8], at: usize, new: &[u8; N]) -> u64 {
    buf.get_mut(at..at + N).and_then(|b| <&mut [u8; N]>::try_from(b).ok()).map_or(0, |old| replace(old, new))
}

/// Applies `delta` to the TCP or UDP checksum `c` (2 bytes). An IPv4 UDP
/// checksum of zero means "none" and stays zero; a computed zero is sent
/// as all ones (RFC 768).
#[inline(always)]
fn update_l4_checksum(c: &mut [u8], proto: Proto, v6: bool, delta: u32) {
    let old = u16::from_be_bytes([c[0], c[1]]);
    if proto == Proto::UDP && !v6 && old == 0 {
        return;
    }
    let mut v = checksum::update(old, delta);
    if proto == Proto::UDP && v == 0 {
        v = 0xffff;
    }
    c.copy_from_slice(&v.to_be_bytes());
}

/// [`translate`] for addresses of `N` bytes: 4 (IPv4, whose header has a
/// checksum) or 16 (IPv6). Fixed sizes let every compare and sum compile
/// to a few word operations.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn translate_n<const N: usize>(
    buf: &mut [u8],
    l3: usize,
    l4: usize,
    end: usize,
    proto: Proto,
    src: &[u8; N],
    dst: &[u8; N],
    ports: &[u8; 4],
) -> Incremental {
    let v6 = N == 16;
    let (sa, da, _) = addr_offsets(l3, v6);
    let mut ip = Incremental::new(if v6 { 0 } else { get16(buf, l3 + 10) });
    let addr_delta = replace_at(buf, sa, src) + replace_at(buf, da, dst);
    ip.add(addr_delta);
    let port_delta = replace_at(buf, l4, ports);
    if let Some(at) = l4_checksum_at(proto, l4, end) {
        // Folding the delta first leaves the one's-complement sum as it was.
        let delta = u32::from(checksum::fold(addr_delta + port_delta));
        update_l4_checksum(&mut buf[at..at + 2], proto, v6, delta);
    }
    ip
}

/// Decrements TTL / hop limit, folding the IPv4 change into `ip`.
fn decrement_ttl(buf: &mut [u8], p: &Parsed, ip: &mut Incremental) {
    if p.v6 {
        buf[p.l3 + 7] = p.ttl - 1;
    } else {
        let proto = buf[p.l3 + 9];
        ip.word(u16::from_be_bytes([p.ttl, proto]), u16::from_be_bytes([p.ttl - 1, proto]));
        buf[p.l3 + 8] = p.ttl - 1;
    }
}

/// Rewrites a TCP/UDP packet of the tracked flow direction `view` to its
/// translation and decrements its TTL (the caller checked `p.ttl > 1`).
///
/// This is the per-packet work of every tracked flow. The packet carries
/// exactly the direction's tuple (that is how it was found), so the
/// checksum deltas of the rewrite were computed once, when the flow was
/// stored: each checksum takes one addition and a fold. The headers are
/// reached through fixed-size views: one bounds check each, then constant
/// offsets.
#[inline(always)]
pub fn rewrite(buf: &mut [u8], p: &Parsed, view: &FlowView) {
    let (addr_delta, l4_delta) = view.checksum_deltas();
    let (src, dst, ports) = (view.rewrite_src(), view.rewrite_dst(), view.rewrite_ports());
    if p.v6 {
        rewrite_fixed::<16, 40>(buf, p, &src.0, &dst.0, &ports, addr_delta, l4_delta);
    } else {
        rewrite_fixed::<4, 20>(buf, p, &octets_v4(&src), &octets_v4(&dst), &ports, addr_delta, l4_delta);
    }
}

/// [`rewrite`] for addresses of `N` bytes in an IP header of (at least) `H`
/// bytes: `N = 4, H = 20` for IPv4, `N = 16, H = 40` for IPv6.
#[inline(always)]
fn rewrite_fixed<const N: usize, const H: usize>(
    buf: &mut [u8],
    p: &Parsed,
    src: &[u8; N],
    dst: &[u8; N],
    new_ports: &[u8; 4],
    addr_delta: u16,
    l4_delta: u16,
) {
    let v6 = N == 16;
    // parse() guaranteed l3 + H <= l4 and the ports (and checksum) within
    // end <= buf.len(); these checks only keep a caller bug from panicking.
    let Some((head, seg)) = buf.split_at_mut_checked(p.l4) else { return };
    let Some(ip) = head.get_mut(p.l3..p.l3 + H).and_then(|b| <&mut [u8; H]>::try_from(b).ok()) else { return };
    let Some(ports) = seg.get_mut(..4) else { return };
    let (sa, ttl_at) = if v6 { (8, 7) } else { (12, 8) };
    ip[sa..sa + N].copy_from_slice(src);
    ip[sa + N..sa + 2 * N].copy_from_slice(dst);
    ports.copy_from_slice(new_ports);
    let l4_sum_at = if p.proto == Proto::TCP { 16 } else { 6 };
    if let Some(c) = seg.get_mut(l4_sum_at..l4_sum_at + 2) {
        update_l4_checksum(c, p.proto, v6, u32::from(l4_delta));
    }
    finish_ip::<N, H>(ip, ttl_at, p.ttl, addr_delta);
}

/// TTL / hop limit minus one and, in IPv4, the header checksum: the
/// addresses' delta plus the TTL's (the word (TTL, protocol) drops by
/// 0x0100, whose RFC 1624 delta is the constant ~0x0100 = 0xfeff).
#[inline(always)]
fn finish_ip<const N: usize, const H: usize>(ip: &mut [u8; H], ttl_at: usize, ttl: u8, addr_delta: u16) {
    ip[ttl_at] = ttl - 1;
    if N == 4 {
        let c = checksum::update(u16::from_be_bytes([ip[10], ip[11]]), u32::from(addr_delta) + 0xfeff);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
}

/// Decrements the TTL / hop limit of a packet routed unchanged (the caller
/// checked `p.ttl > 1`), updating the IPv4 header checksum.
pub fn route_unchanged(buf: &mut [u8], p: &Parsed) {
    let mut ip = Incremental::new(get16(buf, p.l3 + 10));
    decrement_ttl(buf, p, &mut ip);
    if !p.v6 {
        put16(buf, p.l3 + 10, ip.finish());
    }
}

/// Bytes an encapsulation adds: an outer IPv4 (IPIP) or IPv6 (IP6IP6) header.
pub const fn encapsulation_overhead(v6: bool) -> usize {
    if v6 { 40 } else { 20 }
}

/// Encapsulates the packet at `p.l3..p.end` (its TTL decremented, as the
/// hop this gateway is; the caller checked `p.ttl > 1`) in an outer IPv4
/// header of protocol 4 (IPIP) or IPv6 header of next header 41 (IP6IP6)
/// from `outer_src` to `outer_dst`, of the inner packet's family, as the
/// kernel's `ipip` / `ip6tnl` devices do. IPv4 sets DF (PMTU discovery
/// for the tunnel path). Returns the new frame length, or `None` when the
/// buffer has no room.
pub fn encapsulate(buf: &mut [u8], len: usize, p: &Parsed, outer_src: &Addr, outer_dst: &Addr) -> Option<usize> {
    let hdr = encapsulation_overhead(p.v6);
    let inner_len = p.end - p.l3;
    if buf.len() < p.end + hdr || len < p.end {
        return None;
    }
    route_unchanged(buf, p);
    buf.copy_within(p.l3..p.end, p.l3 + hdr);
    write_ip_header(buf, p.l3, p.v6, if p.v6 { 41 } else { 4 }, outer_src, outer_dst, inner_len);
    Some(p.l3 + hdr + inner_len)
}

/// Undoes [`encapsulate`]'s outer header (its length for family `v6`):
/// the frame as the inner packet. Returns the new frame length.
pub fn decapsulate(buf: &mut [u8], len: usize, l3: usize, v6: bool) -> Option<usize> {
    let hdr = encapsulation_overhead(v6);
    if len < l3 + hdr {
        return None;
    }
    buf.copy_within(l3 + hdr..len, l3);
    Some(len - hdr)
}

/// Translates an ICMP error about a NATed flow: the embedded packet gets
/// the tuple `embedded` (its addresses, ports and checksums), the outer
/// destination becomes `embedded.src`, TTL is decremented, and the outer
/// IPv4 and ICMP checksums are recomputed (errors are rare and short). An
/// error sent by the endpoint itself (the embedded packet's destination:
/// its port unreachable) comes from the address the sender used,
/// `embedded.dst` (the VIP), as Linux's NAT writes it; a router's on the
/// way keeps its own address, so traceroute shows the hop.
pub fn rewrite_icmp_error(buf: &mut [u8], p: &Parsed, inner: &Inner, embedded: &FlowKey) {
    let from_endpoint = p.src == inner.dst;
    let ip = translate(buf, inner.l3, inner.l4, p.end, inner.v6, inner.proto, embedded);
    if !inner.v6 {
        put16(buf, inner.l3 + 10, ip.finish());
    }
    let (sa, da, alen) = addr_offsets(p.l3, p.v6);
    buf[da..da + alen].copy_from_slice(addr_bytes(&embedded.src, p.v6));
    if from_endpoint {
        buf[sa..sa + alen].copy_from_slice(addr_bytes(&embedded.dst, p.v6));
    }
    // The outer IPv4 header changed in two places: recompute it in full.
    let ttl_at = if p.v6 { p.l3 + 7 } else { p.l3 + 8 };
    buf[ttl_at] = p.ttl - 1;
    if !p.v6 {
        ipv4_header_checksum(buf, p.l3, p.l4);
    }
    icmp_checksum(buf, p);
}

fn ipv4_header_checksum(buf: &mut [u8], l3: usize, l4: usize) {
    put16(buf, l3 + 10, 0);
    let c = checksum::finish(checksum::sum(&buf[l3..l4]));
    put16(buf, l3 + 10, c);
}

fn icmp_checksum(buf: &mut [u8], p: &Parsed) {
    put16(buf, p.l4 + 2, 0);
    let mut acc = checksum::sum(&buf[p.l4..p.end]);
    if p.v6 {
        let (sa, da, _) = addr_offsets(p.l3, true);
        acc += checksum::pseudo_header(&buf[sa..sa + 16], &buf[da..da + 16], 58, (p.end - p.l4) as u32);
    }
    put16(buf, p.l4 + 2, checksum::finish(acc));
}

/// Writes a fresh IP header at `l3` (no options), returning the L4 offset.
fn write_ip_header(buf: &mut [u8], l3: usize, v6: bool, proto: u8, src: &Addr, dst: &Addr, l4_len: usize) -> usize {
    if v6 {
        buf[l3..l3 + 4].copy_from_slice(&[0x60, 0, 0, 0]);
        put16(buf, l3 + 4, l4_len as u16);
        buf[l3 + 6] = proto;
        buf[l3 + 7] = 64;
        buf[l3 + 8..l3 + 24].copy_from_slice(&src.0);
        buf[l3 + 24..l3 + 40].copy_from_slice(&dst.0);
        l3 + 40
    } else {
        buf[l3..l3 + 12].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, proto, 0, 0]);
        put16(buf, l3 + 2, (20 + l4_len) as u16);
        buf[l3 + 12..l3 + 16].copy_from_slice(&src.0[12..]);
        buf[l3 + 16..l3 + 20].copy_from_slice(&dst.0[12..]);
        ipv4_header_checksum(buf, l3, l3 + 20);
        l3 + 20
    }
}

fn swap_macs(buf: &mut [u8]) {
    let mut dst = [0u8; 6];
    dst.copy_from_slice(&buf[..6]);
    buf.copy_within(6..12, 0);
    buf[6..12].copy_from_slice(&dst);
}

/// Turns a TCP segment into the RST that refuses it (RFC 9293 §3.10.7.1),
/// addressed back to its sender. Returns the new frame length, or `None`
/// for a segment that must not be answered (a RST).
pub fn tcp_reset(buf: &mut [u8], p: &Parsed) -> Option<usize> {
    let flags = p.tcp_flags;
    if flags & tcp_flags::RST != 0 {
        return None;
    }
    let seq = u32::from_be_bytes(buf[p.l4 + 4..p.l4 + 8].try_into().ok()?);
    let ack = u32::from_be_bytes(buf[p.l4 + 8..p.l4 + 12].try_into().ok()?);
    let header_len = usize::from(buf[p.l4 + 12] >> 4) * 4;
    let payload = p.end.saturating_sub(p.l4 + header_len) as u32;
    let (rst_seq, rst_ack, rst_flags) = if flags & tcp_flags::ACK != 0 {
        (ack, 0, tcp_flags::RST)
    } else {
        let len = payload + u32::from(flags & tcp_flags::SYN != 0) + u32::from(flags & tcp_flags::FIN != 0);
        (0, seq.wrapping_add(len), tcp_flags::RST | tcp_flags::ACK)
    };
    swap_macs(buf);
    let l4 = write_ip_header(buf, p.l3, p.v6, 6, &p.dst, &p.src, 20);
    put16(buf, l4, p.dport);
    put16(buf, l4 + 2, p.sport);
    buf[l4 + 4..l4 + 8].copy_from_slice(&rst_seq.to_be_bytes());
    buf[l4 + 8..l4 + 12].copy_from_slice(&rst_ack.to_be_bytes());
    buf[l4 + 12..l4 + 20].copy_from_slice(&[5 << 4, rst_flags, 0, 0, 0, 0, 0, 0]);
    let (sa, da, alen) = addr_offsets(p.l3, p.v6);
    let acc =
        checksum::sum(&buf[l4..l4 + 20]) + checksum::pseudo_header(&buf[sa..sa + alen], &buf[da..da + alen], 6, 20);
    put16(buf, l4 + 16, checksum::finish(acc));
    Some(l4 + 20)
}

/// Turns an echo request (ICMP type 8, ICMPv6 type 128) into its echo
/// reply in place, from the address it was sent to (RFC 792, RFC 4443
/// §4.2: identifier, sequence and data kept). IPv4 options are not copied.
/// Returns the new frame length, or `None` if the message is too short.
pub fn echo_reply(buf: &mut [u8], p: &Parsed) -> Option<usize> {
    let icmp_len = p.end.checked_sub(p.l4).filter(|n| *n >= 8)?;
    let (l4, proto) = if p.v6 { (p.l3 + 40, 58) } else { (p.l3 + 20, 1) };
    // The header written below is never longer than the one it replaces.
    buf.copy_within(p.l4..p.end, l4);
    swap_macs(buf);
    write_ip_header(buf, p.l3, p.v6, proto, &p.dst, &p.src, icmp_len);
    buf[l4] = if p.v6 { 129 } else { 0 };
    buf[l4 + 1] = 0;
    put16(buf, l4 + 2, 0);
    let end = l4 + icmp_len;
    let mut acc = checksum::sum(&buf[l4..end]);
    if p.v6 {
        acc += checksum::pseudo_header(&p.dst.0, &p.src.0, 58, icmp_len as u32);
    }
    put16(buf, l4 + 2, checksum::finish(acc));
    Some(end)
}

/// Largest IPv4 error datagram (RFC 1812 §4.3.2.3) and IPv6 minimum MTU
/// (RFC 4443 §2.4): the quote of the offending packet is cut to fit.
const ICMPV4_MAX: usize = 576;
const ICMPV6_MAX: usize = 1280;

/// An ICMP error the gateway sends about a packet it received.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpErrorKind {
    /// Destination (port) unreachable: kube-proxy's REJECT of UDP.
    PortUnreachable,
    /// Time exceeded in transit: the TTL (hop limit) ran out here.
    TimeExceeded,
    /// Fragmentation needed and DF set (IPv4) / Packet Too Big (IPv6): the
    /// next link carries IP packets of at most `mtu` bytes.
    TooBig { mtu: u16 },
}

/// Turns a datagram into the ICMP port-unreachable that refuses it, from
/// the address it was sent to, quoting as much of it as fits. Returns the
/// new frame length, or `None` when the buffer has no room for the headers.
pub fn port_unreachable(buf: &mut [u8], p: &Parsed) -> Option<usize> {
    let from = p.dst;
    icmp_error_reply(buf, p, &from, IcmpErrorKind::PortUnreachable)
}

/// Turns a received packet into the ICMP error `kind` about it, from
/// `from` back to its sender, quoting as much of it as fits (RFC 1812's 576
/// bytes in all for IPv4, RFC 4443's 1280 for IPv6). Returns the new frame
/// length, or `None` when the buffer has no room for the headers.
pub fn icmp_error_reply(buf: &mut [u8], p: &Parsed, from: &Addr, kind: IcmpErrorKind) -> Option<usize> {
    let (hdrs, max) = if p.v6 { (48, ICMPV6_MAX) } else { (28, ICMPV4_MAX) };
    let room = buf.len().checked_sub(p.l3 + hdrs)?;
    let quoted = (p.end - p.l3).min(max - hdrs).min(room);
    buf.copy_within(p.l3..p.l3 + quoted, p.l3 + hdrs);
    swap_macs(buf);
    let icmp_len = 8 + quoted;
    let proto = if p.v6 { 58 } else { 1 };
    let l4 = write_ip_header(buf, p.l3, p.v6, proto, from, &p.src, icmp_len);
    let (t, c) = match (kind, p.v6) {
        (IcmpErrorKind::PortUnreachable, false) => (3, 3),
        (IcmpErrorKind::PortUnreachable, true) => (1, 4),
        (IcmpErrorKind::TimeExceeded, false) => (11, 0),
        (IcmpErrorKind::TimeExceeded, true) => (3, 0),
        (IcmpErrorKind::TooBig { .. }, false) => (3, 4),
        (IcmpErrorKind::TooBig { .. }, true) => (2, 0),
    };
    buf[l4..l4 + 8].copy_from_slice(&[t, c, 0, 0, 0, 0, 0, 0]);
    if let IcmpErrorKind::TooBig { mtu } = kind {
        // IPv4: the next-hop MTU in the low 16 bits (RFC 1191); IPv6: 32 bits.
        put16(buf, l4 + 6, mtu);
    }
    let end = l4 + icmp_len;
    let mut acc = checksum::sum(&buf[l4..end]);
    if p.v6 {
        acc += checksum::pseudo_header(&from.0, &p.src.0, 58, icmp_len as u32);
    }
    put16(buf, l4 + 2, checksum::finish(acc));
    Some(end)
}
