//! The service table: an immutable snapshot that the control plane builds
//! off the hot path and publishes with one atomic swap; every worker loads
//! it once per batch ([`ServiceTableHandle::load`], lock-free).
//!
//! Keyed by frontend: (address, protocol, port) for ClusterIPs, LoadBalancer
//! ingress IPs and external IPs; (protocol, port) for NodePorts, which answer
//! on every address of the gateway ([`NodeConfig::addresses`]). Each entry is
//! a [`ServicePort`] (one port of one Service) shared by `Arc`, so a table
//! that changes one Service reuses every other entry as is.

use crate::frontend::FrontendIndex;
pub use crate::frontend::FrontendKind;
use crate::maglev::Maglev;
use arc_swap::{ArcSwap, Guard};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use xskgate_conntrack::{Addr, Proto};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// `externalTrafficPolicy` / `internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum TrafficPolicy {
    #[default]
    Cluster,
    Local,
}

impl TrafficPolicy {
    /// The policy as the Service's spec spells it.
    pub fn name(self) -> &'static str {
        match self {
            TrafficPolicy::Cluster => "Cluster",
            TrafficPolicy::Local => "Local",
        }
    }
}

/// Which echo requests to a LoadBalancer IP or externalIP the gateway
/// answers itself (`--vip-echo`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum VipEcho {
    /// Only where a connection to one of the VIP's Services would be
    /// served here: policy Cluster with any usable endpoint, Local with a
    /// usable endpoint on this node. Otherwise dropped (`echo_not_served`),
    /// so that a ping tells the truth about the Service.
    #[default]
    Served,
    /// Every VIP of a Service in the table.
    Always,
    /// None: echo requests are the kernel's (answered if the VIP is one of
    /// its addresses).
    Never,
}

impl VipEcho {
    pub const ALL: [VipEcho; 3] = [VipEcho::Served, VipEcho::Always, VipEcho::Never];

    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            VipEcho::Served => "served",
            VipEcho::Always => "always",
            VipEcho::Never => "never",
        }
    }
}

impl std::str::FromStr for VipEcho {
    type Err = String;

    fn from_str(s: &str) -> Result<VipEcho, String> {
        VipEcho::ALL
            .into_iter()
            .find(|v| v.name() == s)
            .ok_or_else(|| format!("{s:?} is not one of served, always, never"))
    }
}

/// What [`ServiceTable::echo`] decides for an echo request to an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// Not a VIP (or `--vip-echo never`): the kernel's.
    NotVip,
    /// Answer it; the id of the first service port that serves it.
    Answer(u32),
    /// A VIP whose Services would not be served here.
    NotServed,
}

/// An address prefix, IPv4 or IPv6 (IPv4 held IPv4-mapped: prefix + 96).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: Addr,
    bits: u8,
}

impl Cidr {
    /// # Errors
    /// A message when the prefix length is too long for the family.
    pub fn new(ip: IpAddr, prefix_len: u8) -> Result<Cidr, CidrError> {
        let (max, shift) = if ip.is_ipv4() { (32, 96) } else { (128, 0) };
        if prefix_len > max {
            return Err(CidrError::PrefixTooLong { ip, prefix_len });
        }
        let bits = prefix_len + shift;
        let mut addr = Addr::from(ip);
        for (i, b) in addr.0.iter_mut().enumerate() {
            let keep = u32::from(bits).saturating_sub(i as u32 * 8).min(8);
            *b &= if keep == 0 { 0 } else { 0xffu8 << (8 - keep) };
        }
        Ok(Cidr { addr, bits })
    }

    /// The first address of the prefix.
    pub fn network(&self) -> Addr {
        self.addr
    }

    /// The prefix length as written (IPv4: 0–32).
    pub fn prefix_len(&self) -> u8 {
        if self.addr.is_v4() { self.bits - 96 } else { self.bits }
    }

    #[inline]
    pub fn contains(&self, a: &Addr) -> bool {
        let full = usize::from(self.bits / 8);
        if a.0[..full] != self.addr.0[..full] {
            return false;
        }
        let rest = self.bits % 8;
        rest == 0 || (a.0[full] & (0xffu8 << (8 - rest))) == self.addr.0[full]
    }
}

/// Why a CIDR is not one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{text:?}: {source}")]
    Address { text: String, source: std::net::AddrParseError },
    #[error("{text:?}: bad prefix length: {source}")]
    PrefixLength { text: String, source: std::num::ParseIntError },
    #[error("prefix length {prefix_len} is too long for {ip}")]
    PrefixTooLong { ip: IpAddr, prefix_len: u8 },
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Cidr, CidrError> {
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip.trim().parse().map_err(|source| CidrError::Address { text: s.to_string(), source })?;
        let len = match len {
            Some(l) => {
                l.trim().parse::<u8>().map_err(|source| CidrError::PrefixLength { text: s.to_string(), source })?
            }
            None if ip.is_ipv4() => 32,
            None => 128,
        };
        Cidr::new(ip, len)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = if self.addr.is_v4() { self.bits - 96 } else { self.bits };
        write!(f, "{}/{len}", self.addr)
    }
}

/// Identity of one port of one Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServicePortName {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
}

impl std::fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.port_name.is_empty() {
            write!(f, "{}/{}", self.namespace, self.name)
        } else {
            write!(f, "{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }
}

/// One backend address of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    pub addr: Addr,
    pub port: u16,
    /// Stable reference kept in conntrack and affinity entries (assigned by
    /// the control plane; the same endpoint keeps its id across tables).
    pub id: u32,
}

/// The endpoints a class of traffic may use, with their Maglev table.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct EndpointSet {
    endpoints: Vec<Endpoint>,
    maglev: Maglev,
}

impl EndpointSet {
    /// Sorts and deduplicates (by address and port) so that every gateway
    /// builds the same Maglev table from the same endpoints.
    pub fn new(mut endpoints: Vec<Endpoint>) -> EndpointSet {
        endpoints.sort_by_key(|e| (e.addr, e.port));
        endpoints.dedup_by_key(|e| (e.addr, e.port));
        let keys: Vec<(Addr, u16)> = endpoints.iter().map(|e| (e.addr, e.port)).collect();
        EndpointSet { maglev: Maglev::new(&keys), endpoints }
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// The Maglev choice for a flow hash.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> Option<&Endpoint> {
        self.maglev.pick(flow_hash).and_then(|i| self.endpoints.get(i))
    }

    /// The endpoint with this id, if it is still in the set.
    #[inline]
    pub fn by_id(&self, id: u32) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    /// Starts loading what [`EndpointSet::pick`] reads for `flow_hash`: its
    /// Maglev entry and the start of the endpoint list.
    #[inline]
    pub fn prefetch_pick(&self, flow_hash: u64) {
        if !self.endpoints.is_empty() {
            self.maglev.prefetch(flow_hash);
            xskgate_conntrack::prefetch_line(self.endpoints.as_ptr().cast());
        }
    }

    /// Starts loading the endpoint [`EndpointSet::pick`] returns for
    /// `flow_hash`. Reads its Maglev entry: call it a pass after
    /// [`EndpointSet::prefetch_pick`], when that entry has arrived.
    #[inline]
    pub fn prefetch_endpoint(&self, flow_hash: u64) {
        if let Some(e) = self.pick(flow_hash) {
            let start = std::ptr::from_ref(e).cast::<u8>();
            // An endpoint may straddle two lines.
            xskgate_conntrack::prefetch_line(start);
            xskgate_conntrack::prefetch_line(start.wrapping_add(std::mem::size_of::<Endpoint>() - 1));
        }
    }
}

/// A frontend of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Frontend {
    pub kind: FrontendKind,
    /// For `NodePort`, which answers on every gateway address, only the
    /// family counts: `0.0.0.0` (IPv4-mapped) for IPv4, `::` for IPv6.
    pub addr: Addr,
    pub port: u16,
}

/// Where [`ServiceTable::find`] found a frame's service port: valid for
/// the table that found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    index: u32,
    pub kind: FrontendKind,
}

/// One port of one Service, as the fast path needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Stable id: conntrack entries, counters and flushes refer to it.
    pub id: u32,
    pub name: ServicePortName,
    pub proto: Proto,
    pub frontends: Vec<Frontend>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    /// Usable endpoints cluster-wide (ready, else serving and terminating).
    pub cluster: EndpointSet,
    /// Usable endpoints on this node.
    pub local: EndpointSet,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// `loadBalancerSourceRanges` (enforced for LoadBalancer frontends only).
    pub source_ranges: Vec<Cidr>,
    pub health_check_node_port: Option<u16>,
    /// Direct server return for external traffic to its LoadBalancer IPs
    /// and externalIPs under policy Cluster: the client's packet,
    /// unchanged, encapsulated (IPIP / IP6IP6) to the endpoint, whose reply
    /// goes straight to the client. Not tracked: Maglev picks the same
    /// endpoint for every packet of a flow.
    pub dsr: bool,
}

/// What the gateway itself is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Addresses NodePorts answer on.
    pub addresses: Vec<Addr>,
    /// The cluster's pod CIDRs: traffic from them is internal.
    pub pod_cidrs: Vec<Cidr>,
    /// Masquerade (SNAT) source addresses per family.
    pub snat_v4: Option<Addr>,
    pub snat_v6: Option<Addr>,
    /// SNAT source port range (inclusive).
    pub snat_ports: (u16, u16),
    /// Per-egress masquerade addresses: (destination prefix, the address of
    /// the interface that prefix is routed by), longest prefix first. The
    /// first prefix holding the endpoint gives its SNAT address; without
    /// one, `snat_v4`/`snat_v6` do.
    pub snat_routes: Vec<(Cidr, Addr)>,
    /// Which echo requests to VIPs the gateway answers.
    pub vip_echo: VipEcho,
}

impl NodeConfig {
    /// The masquerade address for a flow to `endpoint`.
    #[inline]
    pub fn snat_for(&self, endpoint: &Addr) -> Option<Addr> {
        let v4 = endpoint.is_v4();
        self.snat_routes.iter().find(|(c, a)| a.is_v4() == v4 && c.contains(endpoint)).map(|(_, a)| *a).or(if v4 {
            self.snat_v4
        } else {
            self.snat_v6
        })
    }
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        NodeConfig {
            addresses: Vec::new(),
            pod_cidrs: Vec::new(),
            snat_v4: None,
            snat_v6: None,
            snat_ports: (1024, 65535),
            snat_routes: Vec::new(),
            vip_echo: VipEcho::Served,
        }
    }
}

/// Why a service port was not added to a table.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// Another service port already owns this frontend.
    #[error("{} {}:{}/{} is already served by {owner}", frontend.kind.name(), frontend.addr, frontend.port, proto.name())]
    FrontendConflict { frontend: Frontend, proto: Proto, owner: ServicePortName },
    #[error("protocol {} is not supported (TCP and UDP are)", .0.name())]
    UnsupportedProtocol(Proto),
    /// Two service ports with the same id (a control-plane bug).
    #[error("service port id {0} is used twice")]
    DuplicateId(u32),
}

/// An immutable, published service table.
#[derive(Debug, Default, Clone)]
pub struct ServiceTable {
    node: NodeConfig,
    ports: Vec<Arc<ServicePort>>,
    /// Service port id → index in `ports`.
    // The maps are shared between a table and the tables made from it by
    // `with_changes` until a change touches them (copy on write): an
    // endpoint change, the common one, copies none of them.
    by_id: Arc<FastMap<u32, u32>>,
    /// (address, protocol, port) of a frontend → (index in `ports`, kind).
    frontends: Arc<FrontendIndex>,
    /// Keyed by (IPv6?, protocol, port): a dual-stack Service has one entry per family.
    node_ports: Arc<FastMap<(bool, Proto, u16), u32>>,
    /// LoadBalancer IP or externalIP → ids of the service ports it fronts
    /// (for echo requests).
    vips: Arc<FastMap<Addr, Vec<u32>>>,
    generation: u64,
    /// For a table made by [`ServiceTable::with_changes`]: the generation
    /// it was made from and the ids of the ports it changed (upserted or
    /// removed), so that followers can update in time proportional to the
    /// change.
    parent: Option<(u64, Arc<[u32]>)>,
}

impl ServiceTable {
    /// The service port a new flow to `dst:port` belongs to, and how it was
    /// reached.
    #[inline]
    pub fn lookup(&self, dst: &Addr, proto: Proto, port: u16) -> Option<(&ServicePort, FrontendKind)> {
        let found = self.find(dst, proto, port)?;
        Some((self.get(found)?, found.kind))
    }

    /// [`ServiceTable::lookup`] in two steps, for a batch that finds a
    /// frame's service port once and reads it in later passes: the port's
    /// place in this table, and how it was reached.
    #[inline]
    pub fn find(&self, dst: &Addr, proto: Proto, port: u16) -> Option<Found> {
        if let Some((index, kind)) = self.frontends.get(dst, proto, port) {
            return Some(Found { index, kind });
        }
        if !self.node_ports.is_empty()
            && self.is_node_address(dst)
            && let Some(&index) = self.node_ports.get(&(!dst.is_v4(), proto, port))
        {
            return Some(Found { index, kind: FrontendKind::NodePort });
        }
        None
    }

    /// Starts loading what [`ServiceTable::find`] reads first for this
    /// frontend, for a batch that looks it up in a later pass.
    #[inline]
    pub fn prefetch_frontend(&self, dst: &Addr, proto: Proto, port: u16) {
        self.frontends.prefetch(dst, proto, port);
    }

    /// The service port `found` names (`None` only for a `found` from
    /// another table).
    #[inline]
    pub fn get(&self, found: Found) -> Option<&ServicePort> {
        self.ports.get(found.index as usize).map(|p| &**p)
    }

    /// Starts loading the service port `found` names, for a batch that
    /// decides its new flows in a later pass: with thousands of Services
    /// the decision otherwise walks a chain of cache misses.
    #[inline]
    pub fn prefetch(&self, found: Found) {
        if let Some(svc) = self.get(found) {
            let start = std::ptr::from_ref(svc).cast::<u8>();
            for line in (0..std::mem::size_of::<ServicePort>()).step_by(64) {
                xskgate_conntrack::prefetch_line(start.wrapping_add(line));
            }
        }
    }

    #[inline]
    pub fn is_node_address(&self, a: &Addr) -> bool {
        self.node.addresses.contains(a)
    }

    /// True if `a` is in one of the cluster's pod CIDRs.
    #[inline]
    pub fn is_pod(&self, a: &Addr) -> bool {
        self.node.pod_cidrs.iter().any(|c| c.contains(a))
    }

    pub fn node(&self) -> &NodeConfig {
        &self.node
    }

    /// Whether the gateway answers an echo request to `dst` itself: for a
    /// LoadBalancer IP or externalIP, as `--vip-echo` says (the external
    /// policy's endpoint set decides "served").
    pub fn echo(&self, dst: &Addr) -> Echo {
        if self.node.vip_echo == VipEcho::Never {
            return Echo::NotVip;
        }
        let Some(ids) = self.vips.get(dst) else { return Echo::NotVip };
        let served = |p: &ServicePort| match p.external_policy {
            TrafficPolicy::Cluster => !p.cluster.is_empty(),
            TrafficPolicy::Local => !p.local.is_empty(),
        };
        let ports = ids.iter().filter_map(|id| self.port(*id));
        let always = self.node.vip_echo == VipEcho::Always;
        match ports.clone().find(|p| always || served(p)) {
            Some(p) => Echo::Answer(p.id),
            None if ids.is_empty() => Echo::NotVip,
            None => Echo::NotServed,
        }
    }

    /// The LoadBalancer IPs and externalIPs of the table (the addresses
    /// [`ServiceTable::echo`] may answer).
    pub fn vips(&self) -> impl Iterator<Item = &Addr> {
        self.vips.keys()
    }

    pub fn ports(&self) -> &[Arc<ServicePort>] {
        &self.ports
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The service port with this id.
    pub fn port(&self, id: u32) -> Option<&Arc<ServicePort>> {
        self.by_id.get(&id).and_then(|&i| self.ports.get(i as usize))
    }

    /// The ids of the only service ports that can differ from the table of
    /// generation `generation` (upserted or removed), when this table was
    /// made from that one by [`ServiceTable::with_changes`]; `None` when it
    /// was not (then everything must be compared).
    pub fn changed_since(&self, generation: u64) -> Option<&[u32]> {
        match &self.parent {
            Some((g, ids)) if *g == generation => Some(ids),
            _ => None,
        }
    }

    /// A new table equal to this one with `changes` applied, built in time
    /// proportional to the table's size for one copy plus the changes (no
    /// re-insertion of unchanged ports): what the control plane publishes
    /// after one EndpointSlice change. Changes that conflict are returned as
    /// errors and left out; everything else is applied.
    pub fn with_changes(&self, generation: u64, changes: Vec<PortChange>) -> (ServiceTable, Vec<BuildError>) {
        let mut t = self.clone();
        t.generation = generation;
        let ids = changes.iter().map(|c| match c {
            PortChange::Remove(id) => *id,
            PortChange::Upsert(p) => p.id,
        });
        t.parent = Some((self.generation, ids.collect()));
        let mut errors = Vec::new();
        for c in changes {
            match c {
                PortChange::Remove(id) => {
                    if let Some(&i) = t.by_id.get(&id) {
                        t.remove_at(i as usize);
                    }
                }
                PortChange::Upsert(port) => {
                    if let Some(&i) = t.by_id.get(&port.id) {
                        let old = &t.ports[i as usize];
                        if old.frontends == port.frontends && old.proto == port.proto {
                            // Endpoints or policies changed: the maps stay.
                            t.ports[i as usize] = port;
                            continue;
                        }
                        t.remove_at(i as usize);
                    }
                    if let Err(e) = t.insert(port) {
                        errors.push(e);
                    }
                }
            }
        }
        (t, errors)
    }

    fn frontend_conflict(&self, port: &ServicePort) -> Result<(), BuildError> {
        for f in &port.frontends {
            let taken = match f.kind {
                FrontendKind::NodePort => self.node_ports.get(&(!f.addr.is_v4(), port.proto, f.port)).copied(),
                _ => self.frontends.get(&f.addr, port.proto, f.port).map(|(i, _)| i),
            };
            if let Some(i) = taken {
                let owner = self.ports[i as usize].name.clone();
                return Err(BuildError::FrontendConflict { frontend: *f, proto: port.proto, owner });
            }
        }
        Ok(())
    }

    fn index_frontends(&mut self, i: u32) {
        let port = self.ports[i as usize].clone();
        for f in &port.frontends {
            match f.kind {
                FrontendKind::NodePort => {
                    Arc::make_mut(&mut self.node_ports).insert((!f.addr.is_v4(), port.proto, f.port), i);
                }
                kind => {
                    Arc::make_mut(&mut self.frontends).insert(f.addr, port.proto, f.port, i, kind);
                }
            }
            if matches!(f.kind, FrontendKind::LoadBalancer | FrontendKind::ExternalIp) {
                let ids = Arc::make_mut(&mut self.vips).entry(f.addr).or_default();
                if !ids.contains(&port.id) {
                    ids.push(port.id);
                }
            }
        }
        Arc::make_mut(&mut self.by_id).insert(port.id, i);
    }

    fn insert(&mut self, port: Arc<ServicePort>) -> Result<(), BuildError> {
        if port.proto != Proto::TCP && port.proto != Proto::UDP {
            return Err(BuildError::UnsupportedProtocol(port.proto));
        }
        self.frontend_conflict(&port)?;
        if self.by_id.contains_key(&port.id) {
            return Err(BuildError::DuplicateId(port.id));
        }
        self.ports.push(port);
        self.index_frontends(self.ports.len() as u32 - 1);
        Ok(())
    }

    /// Removes the port at `i`; the last port moves into its place.
    fn remove_at(&mut self, i: usize) {
        let port = self.ports.swap_remove(i);
        for f in &port.frontends {
            match f.kind {
                FrontendKind::NodePort => {
                    Arc::make_mut(&mut self.node_ports).remove(&(!f.addr.is_v4(), port.proto, f.port))
                }
                _ => Arc::make_mut(&mut self.frontends).remove(&f.addr, port.proto, f.port).map(|(i, _)| i),
            };
            if let Some(ids) = Arc::make_mut(&mut self.vips).get_mut(&f.addr) {
                ids.retain(|id| *id != port.id);
                if ids.is_empty() {
                    Arc::make_mut(&mut self.vips).remove(&f.addr);
                }
            }
        }
        Arc::make_mut(&mut self.by_id).remove(&port.id);
        if i < self.ports.len() {
            self.index_frontends(i as u32);
        }
    }
}

/// One change to a published table.
#[derive(Clone, Debug)]
pub enum PortChange {
    /// Add a service port, or replace the one with the same id.
    Upsert(Arc<ServicePort>),
    /// Remove the service port with this id.
    Remove(u32),
}

/// Builds a [`ServiceTable`]; the control plane's entry point.
#[derive(Debug)]
pub struct ServiceTableBuilder {
    table: ServiceTable,
}

impl ServiceTableBuilder {
    pub fn new(node: NodeConfig, generation: u64) -> ServiceTableBuilder {
        ServiceTableBuilder { table: ServiceTable { node, generation, ..ServiceTable::default() } }
    }

    /// Adds a service port with all its frontends, or none of them.
    ///
    /// # Errors
    /// [`BuildError`] when a frontend is taken or the protocol unsupported;
    /// the table is unchanged then.
    pub fn add(&mut self, port: Arc<ServicePort>) -> Result<(), BuildError> {
        self.table.insert(port)
    }

    pub fn build(self) -> ServiceTable {
        self.table
    }
}

/// The published table: one writer (the control plane), many readers.
#[derive(Debug)]
pub struct ServiceTableHandle {
    current: ArcSwap<ServiceTable>,
}

impl ServiceTableHandle {
    pub fn new(table: ServiceTable) -> ServiceTableHandle {
        ServiceTableHandle { current: ArcSwap::from_pointee(table) }
    }

    /// Publishes a new table with one atomic swap. Readers holding the old
    /// one finish their batch with it.
    pub fn publish(&self, table: ServiceTable) {
        self.current.store(Arc::new(table));
    }

    /// [`ServiceTableHandle::publish`] for a table the publisher keeps too.
    pub fn publish_arc(&self, table: Arc<ServiceTable>) {
        self.current.store(table);
    }

    /// The current table, for one batch (lock-free, no allocation).
    #[inline]
    pub fn load(&self) -> Guard<Arc<ServiceTable>> {
        self.current.load()
    }

    /// The current table as an owned `Arc`, for holders outside the hot path
    /// (health checks, diagnostics).
    pub fn load_full(&self) -> Arc<ServiceTable> {
        self.current.load_full()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn port(id: u32, vip: u8, node_port: Option<u16>, endpoints: u8) -> Arc<ServicePort> {
        let mut frontends =
            vec![Frontend { kind: FrontendKind::LoadBalancer, addr: Addr::from_v4([198, 18, 100, vip]), port: 80 }];
        if let Some(n) = node_port {
            frontends.push(Frontend { kind: FrontendKind::NodePort, addr: Addr::from_v4([0; 4]), port: n });
        }
        let eps =
            (0..endpoints).map(|e| Endpoint { addr: Addr::from_v4([198, 19, vip, e]), port: 8080, id: u32::from(e) });
        Arc::new(ServicePort {
            id,
            name: ServicePortName { namespace: "ns".into(), name: format!("s{id}"), port_name: String::new() },
            proto: Proto::TCP,
            frontends,
            external_policy: TrafficPolicy::Cluster,
            internal_policy: TrafficPolicy::Cluster,
            cluster: EndpointSet::new(eps.collect()),
            local: EndpointSet::default(),
            affinity_timeout: None,
            source_ranges: vec![],
            health_check_node_port: None,
            dsr: false,
        })
    }

    fn answers(t: &ServiceTable) -> Vec<Option<(u32, usize)>> {
        let gw = Addr::from_v4([198, 18, 0, 1]);
        (0..8u8)
            .map(|v| t.lookup(&Addr::from_v4([198, 18, 100, v]), Proto::TCP, 80))
            .chain((30000..30004).map(|n| t.lookup(&gw, Proto::TCP, n)))
            .map(|r| r.map(|(p, _)| (p.id, p.cluster.len())))
            .collect()
    }

    proptest! {
        /// Patching a table gives the same answers as building the final set
        /// from scratch, conflicts included.
        #[test]
        fn with_changes_equals_a_fresh_build(
            ops in prop::collection::vec((0u32..6, 0u8..8, prop::option::of(30000u16..30004), 0u8..4, any::<bool>()), 1..40)
        ) {
            let node = NodeConfig { addresses: vec![Addr::from_v4([198, 18, 0, 1])], ..NodeConfig::default() };
            let mut table = ServiceTableBuilder::new(node.clone(), 0).build();
            // The model: what a fresh build of the surviving ports gives.
            let mut live: Vec<Arc<ServicePort>> = Vec::new();
            for (g, (id, vip, np, eps, remove)) in ops.into_iter().enumerate() {
                let change = if remove { PortChange::Remove(id) } else { PortChange::Upsert(port(id, vip, np, eps)) };
                let (next, errors) = table.with_changes(g as u64 + 1, vec![change.clone()]);
                match change {
                    PortChange::Remove(id) => live.retain(|p| p.id != id),
                    PortChange::Upsert(p) => {
                        live.retain(|q| q.id != p.id);
                        if errors.is_empty() {
                            live.push(p);
                        }
                    }
                }
                let mut b = ServiceTableBuilder::new(node.clone(), 0);
                for p in &live {
                    b.add(p.clone()).expect("the model only keeps ports that were accepted");
                }
                prop_assert_eq!(answers(&next), answers(&b.build()));
                prop_assert_eq!(next.generation(), g as u64 + 1);
                table = next;
            }
        }
    }

    #[test]
    fn cidrs_match_by_prefix_in_both_families() {
        let c: Cidr = "198.18.0.0/15".parse().unwrap();
        assert!(c.contains(&Addr::from_v4([198, 19, 255, 255])));
        assert!(!c.contains(&Addr::from_v4([198, 20, 0, 0])));
        assert_eq!(c.to_string(), "198.18.0.0/15");
        let c6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c6.contains(&Addr::from("2001:db8:ffff::1".parse::<IpAddr>().unwrap())));
        assert!(!c6.contains(&Addr::from_v4([198, 18, 0, 1])));
        assert!("198.18.0.0/33".parse::<Cidr>().is_err());
        assert!("bogus".parse::<Cidr>().is_err());
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(&Addr::from_v4([1, 2, 3, 4])));
        assert!(!all.contains(&Addr::from("2001:db8::1".parse::<IpAddr>().unwrap())));
    }
}
