//! The kernel's forwarding state over rtnetlink: interfaces (index, name,
//! MAC), addresses, routes of the main table and resolved neighbours,
//! mirrored into the fast path's [`Fib`] snapshot; and resolution of next
//! hops as `managed` neighbour entries (the kernel keeps them resolved by
//! itself, Linux ≥ 5.16).
//!
//! Contract: [`Mirror::fib`] is one consistent-enough dump (links,
//! addresses, routes, neighbours, in that order); the daemon re-reads it
//! periodically and publishes it when it changed.

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteType};
use rtnetlink::packet_utils::nla::DefaultNla;
use rtnetlink::{Handle, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use xskgate_conntrack::Addr;
use xskgate_fastpath::Cidr;
use xskgate_fastpath::io::route::{Fib, Link, Route};

/// `NDA_FLAGS_EXT` and its `NTF_EXT_MANAGED` bit (linux/neighbour.h).
const NDA_FLAGS_EXT: u16 = 15;
const NTF_EXT_MANAGED: u32 = 1;
/// The main routing table.
const RT_TABLE_MAIN: u32 = 254;

/// An address of an interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterfaceAddress {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
}

/// What an rtnetlink notification means for the FIB snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FibEvent {
    /// A neighbour became usable (or changed its MAC).
    Neighbour { ifindex: u32, addr: Addr, mac: [u8; 6] },
    /// A neighbour went away or became unusable.
    NeighbourGone { ifindex: u32, addr: Addr },
    /// A link, address or route changed: re-read everything.
    Other,
}

const fn group(g: u32) -> u32 {
    1 << (g - 1)
}
/// RTNLGRP_LINK, _NEIGH, _IPV4_IFADDR, _IPV4_ROUTE, _IPV6_IFADDR, _IPV6_ROUTE.
const EVENT_GROUPS: u32 = group(1) | group(3) | group(5) | group(7) | group(9) | group(11);

/// Subscribes to link, address, route and neighbour notifications. The
/// first dump should be taken after this returns, so no change falls
/// between the dump and the subscription.
pub fn events() -> Result<tokio::sync::mpsc::UnboundedReceiver<FibEvent>, NetlinkError> {
    use netlink_sys::AsyncSocket;
    use rtnetlink::packet_core::NetlinkPayload;
    use rtnetlink::packet_route::RouteNetlinkMessage;
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection().map_err(|e| err("socket", e))?;
    conn.socket_mut()
        .socket_mut()
        .bind(&netlink_sys::SocketAddr::new(0, EVENT_GROUPS))
        .map_err(|e| err("subscribing to notifications", e))?;
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        // Keeps the connection's handle alive with the task.
        let _handle = _handle;
        while let Some((m, _)) = futures::StreamExt::next(&mut messages).await {
            let event = match m.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)) => match neighbour_entry(&n) {
                    Some((ifindex, addr, mac)) => FibEvent::Neighbour { ifindex, addr, mac },
                    None => match neighbour_addr(&n) {
                        Some(addr) => FibEvent::NeighbourGone { ifindex: n.header.ifindex, addr },
                        None => continue,
                    },
                },
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelNeighbour(n)) => match neighbour_addr(&n) {
                    Some(addr) => FibEvent::NeighbourGone { ifindex: n.header.ifindex, addr },
                    None => continue,
                },
                NetlinkPayload::InnerMessage(_) => FibEvent::Other,
                _ => continue,
            };
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

fn neighbour_addr(m: &rtnetlink::packet_route::neighbour::NeighbourMessage) -> Option<Addr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => Some(Addr::from(IpAddr::V4(*v4))),
        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => Some(Addr::from(IpAddr::V6(*v6))),
        _ => None,
    })
}

/// (ifindex, address, MAC) of a neighbour in a usable state.
fn neighbour_entry(m: &rtnetlink::packet_route::neighbour::NeighbourMessage) -> Option<(u32, Addr, [u8; 6])> {
    let usable = matches!(
        m.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !usable {
        return None;
    }
    let mac = m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLocalAddress(b) if b.len() == 6 => Some([b[0], b[1], b[2], b[3], b[4], b[5]]),
        _ => None,
    })?;
    Some((m.header.ifindex, neighbour_addr(m)?, mac))
}

/// An rtnetlink connection.
#[derive(Clone)]
pub struct Mirror {
    handle: Handle,
}

/// An rtnetlink request that failed, and what it was.
#[derive(Debug, thiserror::Error)]
#[error("rtnetlink {what}: {source}")]
pub struct NetlinkError {
    pub what: String,
    source: Box<dyn std::error::Error + Send + Sync>,
}

fn err(what: &str, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> NetlinkError {
    NetlinkError { what: what.to_string(), source: e.into() }
}

impl Mirror {
    /// Opens the connection (its driver runs on the current tokio runtime).
    pub fn new() -> Result<Mirror, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(|e| err("socket", e))?;
        tokio::spawn(conn);
        Ok(Mirror { handle })
    }

    pub async fn links(&self) -> Result<Vec<Link>, NetlinkError> {
        let mut out = Vec::new();
        let mut s = self.handle.link().get().execute();
        while let Some(m) = s.try_next().await.map_err(|e| err("link dump", e))? {
            let mut name = String::new();
            let (mut mac, mut mtu) = ([0u8; 6], 0);
            for a in &m.attributes {
                match a {
                    LinkAttribute::IfName(n) => name.clone_from(n),
                    LinkAttribute::Address(b) if b.len() == 6 => mac.copy_from_slice(b),
                    LinkAttribute::Mtu(m) => mtu = *m,
                    _ => {}
                }
            }
            out.push(Link { ifindex: m.header.index, name, mac, mtu });
        }
        Ok(out)
    }

    pub async fn addresses(&self) -> Result<Vec<InterfaceAddress>, NetlinkError> {
        let mut out = Vec::new();
        let mut s = self.handle.address().get().execute();
        while let Some(m) = s.try_next().await.map_err(|e| err("address dump", e))? {
            // IFA_LOCAL is the interface's own address (IFA_ADDRESS is the
            // peer's on point-to-point links); IPv6 has only IFA_ADDRESS.
            let local = m.attributes.iter().find_map(|a| match a {
                AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            });
            let addr = local.or_else(|| {
                m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(ip) => Some(*ip),
                    _ => None,
                })
            });
            if let Some(addr) = addr {
                out.push(InterfaceAddress { ifindex: m.header.index, addr, prefix_len: m.header.prefix_len });
            }
        }
        Ok(out)
    }

    pub async fn routes(&self) -> Result<Vec<Route>, NetlinkError> {
        let mut out = Vec::new();
        for msg in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()] {
            let mut s = self.handle.route().get(msg).execute();
            while let Some(m) = s.try_next().await.map_err(|e| err("route dump", e))? {
                let mut table = u32::from(m.header.table);
                let (mut dst, mut gateway, mut oif, mut metric) = (None, None, None, 0);
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Destination(d) => dst = route_ip(d),
                        RouteAttribute::Gateway(g) => gateway = route_ip(g),
                        RouteAttribute::Oif(i) => oif = Some(*i),
                        RouteAttribute::Priority(p) => metric = *p,
                        _ => {}
                    }
                }
                if table != RT_TABLE_MAIN || m.header.kind != RouteType::Unicast {
                    continue;
                }
                let Some(oif) = oif else { continue };
                let dst = dst.unwrap_or(if m.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6 {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                } else {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                });
                let Ok(dst) = Cidr::new(dst, m.header.destination_prefix_length) else { continue };
                out.push(Route { dst, gateway: gateway.map(Addr::from), oif, metric });
            }
        }
        Ok(out)
    }

    /// Neighbours with a usable MAC address.
    pub async fn neighbours(&self) -> Result<Vec<(u32, Addr, [u8; 6])>, NetlinkError> {
        let mut out = Vec::new();
        let mut s = self.handle.neighbours().get().execute();
        while let Some(m) = s.try_next().await.map_err(|e| err("neighbour dump", e))? {
            out.extend(neighbour_entry(&m));
        }
        Ok(out)
    }

    /// The whole snapshot.
    pub async fn fib(&self) -> Result<(Fib, Vec<InterfaceAddress>), NetlinkError> {
        let links = self.links().await?;
        let addresses = self.addresses().await?;
        let routes = self.routes().await?;
        let neighbours = self.neighbours().await?;
        let local = addresses.iter().map(|a| Addr::from(a.addr)).collect();
        Ok((Fib::new(routes, neighbours, links, local), addresses))
    }

    /// Asks the kernel to resolve `addr` on `ifindex` and keep it resolved
    /// (a `managed` neighbour entry).
    pub async fn resolve(&self, ifindex: u32, addr: Addr) -> Result<(), NetlinkError> {
        let mut req = self
            .handle
            .neighbours()
            .add(ifindex, addr.to_ip())
            .state(NeighbourState::None)
            .flags(NeighbourFlags::ExtLearned)
            .replace();
        req.message_mut()
            .attributes
            .push(NeighbourAttribute::Other(DefaultNla::new(NDA_FLAGS_EXT, NTF_EXT_MANAGED.to_ne_bytes().to_vec())));
        req.execute().await.map_err(|e| err(&format!("managed neighbour {addr} on ifindex {ifindex}"), e))
    }
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}
