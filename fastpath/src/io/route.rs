//! The forwarding information the workers read: routes, neighbours and
//! interfaces, mirrored from the kernel by the control plane (rtnetlink) and
//! published as an immutable snapshot (arc-swap), like the service table.
//!
//! Contract: [`Fib::next_hop`] is the kernel's choice for a destination in
//! the main table (longest prefix, then lowest metric); [`Fib::neighbour`]
//! and [`Fib::link`] give the MAC addresses to write. Both are allocation-free lookups.

use crate::service::Cidr;
use foldhash::fast::FixedState;
use std::collections::HashMap;
use xskgate_conntrack::Addr;

/// One route of the main table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub dst: Cidr,
    /// `None` for a directly connected prefix.
    pub gateway: Option<Addr>,
    pub oif: u32,
    pub metric: u32,
}

/// An interface: its MAC address and MTU (the largest IP packet it sends;
/// 0 when unknown: no limit is applied).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub ifindex: u32,
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A route decision: leave by `oif` towards `via` (the gateway, or the
/// destination itself when directly connected).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    pub oif: u32,
    pub via: Addr,
}

/// The snapshot.
#[derive(Clone, Debug, Default)]
pub struct Fib {
    /// Sorted by prefix length (longest first), then metric.
    routes: Vec<Route>,
    neighbours: HashMap<(u32, Addr), [u8; 6], FixedState>,
    links: HashMap<u32, Link, FixedState>,
    /// The node's own addresses (frames to them belong to the kernel).
    local: Vec<Addr>,
}

impl Fib {
    pub fn new(
        mut routes: Vec<Route>,
        neighbours: Vec<(u32, Addr, [u8; 6])>,
        links: Vec<Link>,
        local: Vec<Addr>,
    ) -> Fib {
        routes.sort_by(|a, b| b.dst.prefix_len().cmp(&a.dst.prefix_len()).then(a.metric.cmp(&b.metric)));
        Fib {
            routes,
            neighbours: neighbours.into_iter().map(|(i, a, m)| ((i, a), m)).collect(),
            links: links.into_iter().map(|l| (l.ifindex, l)).collect(),
            local,
        }
    }

    /// This snapshot with one neighbour set (`Some(mac)`) or removed.
    pub fn with_neighbour(&self, ifindex: u32, addr: Addr, mac: Option<[u8; 6]>) -> Fib {
        let mut f = self.clone();
        match mac {
            Some(m) => f.neighbours.insert((ifindex, addr), m),
            None => f.neighbours.remove(&(ifindex, addr)),
        };
        f
    }

    /// Where the kernel would send a packet to `dst`.
    #[inline]
    pub fn next_hop(&self, dst: &Addr) -> Option<NextHop> {
        let r = self.routes.iter().find(|r| r.dst.contains(dst))?;
        Some(NextHop { oif: r.oif, via: r.gateway.unwrap_or(*dst) })
    }

    /// The neighbour's MAC, if resolved.
    #[inline]
    pub fn neighbour(&self, oif: u32, via: &Addr) -> Option<[u8; 6]> {
        self.neighbours.get(&(oif, *via)).copied()
    }

    #[inline]
    pub fn link(&self, ifindex: u32) -> Option<&Link> {
        self.links.get(&ifindex)
    }

    #[inline]
    pub fn is_local(&self, a: &Addr) -> bool {
        self.local.contains(a)
    }

    pub fn local_addresses(&self) -> &[Addr] {
        &self.local
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    pub fn links(&self) -> impl Iterator<Item = &Link> {
        self.links.values()
    }

    pub fn neighbour_count(&self) -> usize {
        self.neighbours.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Addr {
        s.parse::<std::net::IpAddr>().unwrap().into()
    }

    #[test]
    fn longest_prefix_then_metric_wins() {
        let fib = Fib::new(
            vec![
                Route { dst: "0.0.0.0/0".parse().unwrap(), gateway: Some(a("198.18.0.1")), oif: 1, metric: 0 },
                Route { dst: "198.18.2.0/24".parse().unwrap(), gateway: None, oif: 3, metric: 100 },
                Route { dst: "198.18.2.0/24".parse().unwrap(), gateway: None, oif: 2, metric: 10 },
                Route { dst: "2001:db8::/32".parse().unwrap(), gateway: Some(a("2001:db8::1")), oif: 4, metric: 0 },
            ],
            vec![(2, a("198.18.2.7"), [2, 0, 0, 0, 0, 7])],
            vec![],
            vec![a("198.18.2.1")],
        );
        assert_eq!(fib.next_hop(&a("198.18.2.7")), Some(NextHop { oif: 2, via: a("198.18.2.7") }));
        assert_eq!(fib.next_hop(&a("198.19.0.1")), Some(NextHop { oif: 1, via: a("198.18.0.1") }));
        assert_eq!(fib.next_hop(&a("2001:db8::5")), Some(NextHop { oif: 4, via: a("2001:db8::1") }));
        assert_eq!(fib.next_hop(&a("2001:db9::5")), None, "no IPv6 default route");
        assert_eq!(fib.neighbour(2, &a("198.18.2.7")), Some([2, 0, 0, 0, 0, 7]));
        assert_eq!(fib.neighbour(3, &a("198.18.2.7")), None);
        assert!(fib.is_local(&a("198.18.2.1")));
    }
}
