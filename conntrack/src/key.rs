//! Flow keys: the 5-tuple a packet is matched by, IPv4 and IPv6 alike.
//!
//! A [`FlowKey`] is plain data (`Copy`, no heap). Addresses are always 16
//! bytes: IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`), so one key type and
//! one code path serve both families. Ports are host-order `u16`s; for ICMP
//! echo flows the caller puts the echo identifier in both ports.
//!
//! Inside the table a key is packed into five 64-bit words ([`FlowKey::to_words`]);
//! two keys are equal iff their words are equal.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// IP protocol number of a flow (the IANA number, as in the IP header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proto(pub u8);

impl Proto {
    pub const ICMP: Proto = Proto(1);
    pub const TCP: Proto = Proto(6);
    pub const UDP: Proto = Proto(17);
    pub const ICMPV6: Proto = Proto(58);

    /// Stable lower-case name used in logs and metrics (`tcp`, `udp`, ...).
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "icmp",
            6 => "tcp",
            17 => "udp",
            58 => "icmpv6",
            132 => "sctp",
            _ => "other",
        }
    }
}

/// An address as stored in a key: 16 bytes, IPv4 as IPv4-mapped IPv6.
/// Aligned to 8 bytes, so that it moves as two words (byte-aligned, the
/// fast path's verdicts and keys were written a byte at a time).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
#[repr(C, align(8))]
pub struct Addr(pub [u8; 16]);

impl Addr {
    pub const UNSPECIFIED: Addr = Addr([0; 16]);

    /// The IPv4-mapped form of an IPv4 address. (Built as one 128-bit
    /// word: the fast path makes two of these per packet, and byte-wise
    /// construction compiles to 16 byte moves each.)
    #[inline]
    pub const fn from_v4(octets: [u8; 4]) -> Addr {
        Addr((0xffff_0000_0000 | u32::from_be_bytes(octets) as u128).to_be_bytes())
    }

    pub const fn from_v6(octets: [u8; 16]) -> Addr {
        Addr(octets)
    }

    /// The IPv4 address if this is an IPv4-mapped address.
    pub fn as_v4(&self) -> Option<[u8; 4]> {
        let b = &self.0;
        if b[..10] == [0; 10] && b[10] == 0xff && b[11] == 0xff { Some([b[12], b[13], b[14], b[15]]) } else { None }
    }

    pub fn is_v4(&self) -> bool {
        self.as_v4().is_some()
    }

    pub fn to_ip(self) -> IpAddr {
        match self.as_v4() {
            Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
            None => IpAddr::V6(Ipv6Addr::from(self.0)),
        }
    }
}

impl From<IpAddr> for Addr {
    fn from(ip: IpAddr) -> Addr {
        match ip {
            IpAddr::V4(v4) => Addr::from_v4(v4.octets()),
            IpAddr::V6(v6) => Addr::from_v6(v6.octets()),
        }
    }
}

impl From<Ipv4Addr> for Addr {
    fn from(ip: Ipv4Addr) -> Addr {
        Addr::from_v4(ip.octets())
    }
}

impl From<Ipv6Addr> for Addr {
    fn from(ip: Ipv6Addr) -> Addr {
        Addr::from_v6(ip.octets())
    }
}

impl std::fmt::Debug for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.to_ip(), f)
    }
}

/// The tuple a packet of one direction of a flow carries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: Proto,
}

impl FlowKey {
    pub fn new(proto: Proto, src: impl Into<Addr>, sport: u16, dst: impl Into<Addr>, dport: u16) -> FlowKey {
        FlowKey { src: src.into(), dst: dst.into(), sport, dport, proto }
    }

    /// The tuple of a packet going the other way (source and destination swapped).
    pub fn reversed(&self) -> FlowKey {
        FlowKey { src: self.dst, dst: self.src, sport: self.dport, dport: self.sport, proto: self.proto }
    }

    /// Packs the key into the five words the table stores and compares.
    /// Word 4 holds `sport | dport << 16 | proto << 32`; its top 24 bits are zero.
    #[inline]
    pub fn to_words(&self) -> [u64; 5] {
        let s = &self.src.0;
        let d = &self.dst.0;
        [
            u64::from_ne_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]),
            u64::from_ne_bytes([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]),
            u64::from_ne_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]),
            u64::from_ne_bytes([d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]]),
            u64::from(self.sport) | u64::from(self.dport) << 16 | u64::from(self.proto.0) << 32,
        ]
    }

    /// Inverse of [`FlowKey::to_words`]; bits above the protocol are ignored.
    #[inline]
    pub fn from_words(w: &[u64; 5]) -> FlowKey {
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[..8].copy_from_slice(&w[0].to_ne_bytes());
        src[8..].copy_from_slice(&w[1].to_ne_bytes());
        dst[..8].copy_from_slice(&w[2].to_ne_bytes());
        dst[8..].copy_from_slice(&w[3].to_ne_bytes());
        FlowKey {
            src: Addr(src),
            dst: Addr(dst),
            sport: w[4] as u16,
            dport: (w[4] >> 16) as u16,
            proto: Proto((w[4] >> 32) as u8),
        }
    }
}

impl std::fmt::Debug for FlowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sock = |a: Addr, p: u16| match a.as_v4() {
            Some(_) => format!("{a}:{p}"),
            None => format!("[{a}]:{p}"),
        };
        write!(f, "{} {} -> {}", self.proto.name(), sock(self.src, self.sport), sock(self.dst, self.dport))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_round_trip_v4_and_v6() {
        let v4 = FlowKey::new(Proto::TCP, Ipv4Addr::new(198, 18, 0, 1), 40000, Ipv4Addr::new(198, 19, 0, 9), 80);
        assert_eq!(FlowKey::from_words(&v4.to_words()), v4);
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let k6 = FlowKey::new(Proto::UDP, v6, 53, Ipv6Addr::LOCALHOST, 5353);
        assert_eq!(FlowKey::from_words(&k6.to_words()), k6);
        assert_ne!(v4.to_words(), k6.to_words());
        assert_eq!(v4.src.as_v4(), Some([198, 18, 0, 1]));
        assert_eq!(k6.src.as_v4(), None);
        assert_eq!(format!("{v4:?}"), "tcp 198.18.0.1:40000 -> 198.19.0.9:80");
        assert_eq!(format!("{k6:?}"), "udp [2001:db8::1]:53 -> [::1]:5353");
    }

    #[test]
    fn reversed_twice_is_identity() {
        let k = FlowKey::new(Proto::UDP, Ipv4Addr::new(198, 18, 0, 1), 1, Ipv4Addr::new(198, 18, 0, 2), 2);
        assert_eq!(k.reversed().reversed(), k);
        assert_eq!(k.reversed().src, k.dst);
        assert_eq!(k.reversed().sport, k.dport);
    }
}
