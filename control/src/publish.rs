//! From translated ports to the published fast-path table.
//!
//! [`Publisher`] keeps, per Service, the fast-path [`ServicePort`]s built
//! from its translation (one per address family, so that Maglev never
//! picks an endpoint of the other family). A change re-translates only the
//! Services it touches, reuses every other `Arc` as is, and publishes the new
//! table with one atomic swap. When nothing changed in what the fast path
//! sees, nothing is published. UDP flows to endpoints that left a port are
//! flushed from conntrack at once, so their next datagram finds a live
//! endpoint.
//!
//! Stable ids: a service port (namespace, name, port name, family) and an
//! endpoint (address, port) keep their id for the life of the process, so
//! conntrack entries and per-service counters stay meaningful across tables.

use crate::object::Key;
use crate::state::ClusterState;
use crate::translate::{EndpointInfo, FrontendEntry, LbMode, NodeIdentity, PortEntry};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use xskgate_conntrack::{Addr, FlowTable, Proto};
use xskgate_fastpath::{
    Endpoint, EndpointSet, Frontend, FrontendKind, NodeConfig, PortChange, ServicePort, ServicePortName, ServiceTable,
    ServiceTableBuilder, ServiceTableHandle, TrafficPolicy,
};

/// What one update did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// A new table was swapped in.
    pub published: bool,
    /// Services translated again.
    pub services_translated: usize,
    pub udp_flows_flushed: usize,
    /// Objects or fields skipped, frontend conflicts.
    pub warnings: Vec<String>,
    /// Translation and publication (the table is live after this).
    pub build_time: Duration,
    /// The UDP flush after publication (one pass over the conntrack table).
    pub flush_time: Duration,
}

#[derive(Default)]
struct Ids {
    /// Per Service: (port name, IPv6?) → id. Looked up without allocating.
    ports: HashMap<Key, Vec<(String, bool, u32)>>,
    next_port: u32,
    endpoints: HashMap<(IpAddr, u16), u32>,
}

impl Ids {
    fn port(&mut self, k: &Key, port_name: &str, v6: bool) -> u32 {
        if let Some(id) = self.ports.get(k).and_then(|v| v.iter().find(|(n, f, _)| n == port_name && *f == v6)) {
            return id.2;
        }
        let id = self.next_port;
        self.next_port += 1;
        self.ports.entry(k.clone()).or_default().push((port_name.to_string(), v6, id));
        id
    }
    fn endpoint(&mut self, ip: IpAddr, port: u16) -> u32 {
        let n = self.endpoints.len() as u32;
        *self.endpoints.entry((ip, port)).or_insert(n)
    }
}

/// Called right after each publication, before the UDP flush: the data
/// path's other tables (the XDP steering maps) follow the service table here.
pub type OnPublish = Box<dyn FnMut(&ServiceTable) + Send>;

/// Keeps the fast-path table in step with the cluster state.
pub struct Publisher {
    handle: Arc<ServiceTableHandle>,
    conntrack: Option<Arc<FlowTable>>,
    ids: Ids,
    entries: BTreeMap<Key, Vec<PortEntry>>,
    ports: BTreeMap<Key, Vec<Arc<ServicePort>>>,
    /// The table last published (patched, not rebuilt, on each change).
    current: Arc<ServiceTable>,
    generation: u64,
    on_publish: Option<OnPublish>,
    /// The mode of Services without an `xskgate.io/lb-mode` annotation.
    default_lb_mode: LbMode,
}

impl Publisher {
    /// A publisher of `handle`, flushing stale UDP flows in `conntrack`.
    pub fn new(handle: Arc<ServiceTableHandle>, conntrack: Option<Arc<FlowTable>>, node: NodeConfig) -> Publisher {
        Publisher {
            handle,
            conntrack,
            ids: Ids::default(),
            entries: BTreeMap::new(),
            ports: BTreeMap::new(),
            current: Arc::new(ServiceTableBuilder::new(node, 0).build()),
            generation: 0,
            on_publish: None,
            default_lb_mode: LbMode::Snat,
        }
    }

    /// The mode of Services without an `xskgate.io/lb-mode` annotation
    /// (`xskgate run --lb-mode`); applies from the next publication.
    pub fn set_default_lb_mode(&mut self, mode: LbMode) {
        self.default_lb_mode = mode;
    }

    /// Every translated port, by Service (for `xskgate table`, health checks).
    pub fn entries(&self) -> impl Iterator<Item = &PortEntry> {
        self.entries.values().flatten()
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Re-translates the `changed` Services and publishes if the fast path
    /// would see a difference.
    pub fn update(&mut self, state: &ClusterState, node: &NodeIdentity, changed: &BTreeSet<Key>) -> Outcome {
        let started = Instant::now();
        let mut out = Outcome::default();
        let mut changes = Vec::new();
        let mut gone = BTreeSet::new();
        for k in changed {
            let (entries, warnings) = state.translate_one(k, node);
            out.warnings.extend(warnings);
            out.services_translated += 1;
            let ports: Vec<Arc<ServicePort>> =
                entries.iter().flat_map(|e| self.service_ports(k, e, &mut out.warnings)).map(Arc::new).collect();
            let old = self.ports.get(k).cloned().unwrap_or_default();
            Self::removed_udp_endpoints(&old, &ports, &mut gone);
            for gone in old.iter().filter(|o| !ports.iter().any(|p| p.id == o.id)) {
                changes.push(PortChange::Remove(gone.id));
            }
            for p in &ports {
                if !old.iter().any(|o| o == p) {
                    changes.push(PortChange::Upsert(p.clone()));
                }
            }
            if entries.is_empty() {
                self.entries.remove(k);
                self.ports.remove(k);
            } else {
                self.entries.insert(k.clone(), entries);
                self.ports.insert(k.clone(), ports);
            }
        }
        if !changes.is_empty() || self.generation == 0 {
            self.generation += 1;
            let (table, errors) = self.current.with_changes(self.generation, changes);
            for e in errors {
                out.warnings.push(format!("{e}; that service port is not served"));
            }
            self.current = Arc::new(table);
            self.handle.publish_arc(self.current.clone());
            if let Some(f) = self.on_publish.as_mut() {
                f(&self.current);
            }
            out.published = true;
        }
        out.build_time = started.elapsed();
        let flushing = Instant::now();
        out.udp_flows_flushed = self.flush(&gone);
        out.flush_time = flushing.elapsed();
        out
    }

    /// Translates everything (start-up, relist).
    pub fn full_sync(&mut self, state: &ClusterState, node: &NodeIdentity) -> Outcome {
        let mut all: BTreeSet<Key> = state.services().keys().cloned().collect();
        all.extend(self.ports.keys().cloned());
        self.update(state, node, &all)
    }

    /// Sets the hook called after each publication.
    pub fn on_publish(&mut self, f: OnPublish) {
        self.on_publish = Some(f);
    }

    /// Removes the UDP flows whose endpoint is an endpoint of no UDP port of
    /// the published table. For a conntrack table resumed after a restart:
    /// the endpoints that went while no process ran were never seen to go,
    /// and their flows' datagrams would vanish into them until the flows
    /// expire. Returns how many flows were removed. Scans the table.
    pub fn flush_udp_to_unknown_endpoints(&self) -> usize {
        let Some(ct) = &self.conntrack else { return 0 };
        let live: BTreeSet<(Addr, u16)> = self
            .current
            .ports()
            .iter()
            .filter(|p| p.proto == Proto::UDP)
            .flat_map(|p| p.cluster.endpoints().iter().chain(p.local.endpoints()))
            .map(|e| (e.addr, e.port))
            .collect();
        ct.flush(|f| f.orig.proto == Proto::UDP && !live.contains(&(f.reply.src, f.reply.sport)))
    }

    /// UDP endpoints of `old` that `new` no longer has.
    fn removed_udp_endpoints(old: &[Arc<ServicePort>], new: &[Arc<ServicePort>], into: &mut BTreeSet<(Addr, u16)>) {
        let endpoints = |p: &ServicePort| -> BTreeSet<Endpoint> {
            p.cluster.endpoints().iter().chain(p.local.endpoints()).copied().collect()
        };
        for o in old.iter().filter(|p| p.proto == Proto::UDP) {
            let now: BTreeSet<Endpoint> = new.iter().filter(|n| n.id == o.id).flat_map(|n| endpoints(n)).collect();
            into.extend(endpoints(o).difference(&now).map(|e| (e.addr, e.port)));
        }
    }

    /// Removes the UDP flows to `gone` (one pass over the table for all of
    /// them), after the table without them was published: a datagram that
    /// arrives in between starts a flow from the new table, never the old.
    fn flush(&self, gone: &BTreeSet<(Addr, u16)>) -> usize {
        match &self.conntrack {
            Some(ct) if !gone.is_empty() => {
                ct.flush(|f| f.orig.proto == Proto::UDP && gone.contains(&(f.reply.src, f.reply.sport)))
            }
            _ => 0,
        }
    }

    /// The fast-path ports of one translated port: one per address family
    /// that has a frontend.
    /// A family this gateway has no address of (none on its interfaces, no
    /// SNAT address) is not served, with a line naming the Service, when
    /// the gateway knows its addresses (`run`; `watch` and `table` do not).
    fn service_ports(&mut self, k: &Key, e: &PortEntry, warnings: &mut Vec<String>) -> Vec<ServicePort> {
        let node = self.current.node();
        let gateway_has = |v6: bool| {
            node.addresses.iter().any(|a| a.is_v4() != v6)
                || node.snat_routes.iter().any(|(_, a)| a.is_v4() != v6)
                || if v6 { node.snat_v6.is_some() } else { node.snat_v4.is_some() }
        };
        let gateway_family = [gateway_has(false), gateway_has(true)];
        let knows_addresses = gateway_family.iter().any(|h| *h);
        let mut out = Vec::new();
        for v6 in [false, true] {
            let of_family = |ip: &IpAddr| ip.is_ipv6() == v6;
            let frontends: Vec<Frontend> = e
                .frontends
                .iter()
                .filter(|f| f.address.as_ref().is_none_or(of_family))
                .map(|f: &FrontendEntry| Frontend {
                    kind: f.kind,
                    addr: match f.address {
                        Some(a) => Addr::from(a),
                        None if v6 => Addr::from_v6([0; 16]),
                        None => Addr::from_v4([0; 4]),
                    },
                    port: f.port,
                })
                .collect();
            // A NodePort alone does not make a family: it needs a ClusterIP,
            // an external address or endpoints of that family.
            let has_family = frontends.iter().any(|f| f.kind != FrontendKind::NodePort)
                || e.cluster.iter().chain(&e.local).flatten().any(|ep| of_family(&ep.ip));
            if !has_family {
                continue;
            }
            if knows_addresses && !gateway_family[usize::from(v6)] {
                let family = if v6 { "IPv6" } else { "IPv4" };
                let label = if e.port_name.is_empty() { format!("port {}", e.port) } else { e.port_name.clone() };
                warnings.push(format!(
                    "Service {}/{} {label}: its {family} frontends are not served: this gateway has no {family} address",
                    e.namespace, e.name
                ));
                continue;
            }
            let mut set = |list: &Option<Vec<EndpointInfo>>| {
                EndpointSet::new(
                    list.iter()
                        .flatten()
                        .filter(|ep| of_family(&ep.ip))
                        .map(|ep| Endpoint {
                            addr: Addr::from(ep.ip),
                            port: ep.port,
                            id: self.ids.endpoint(ep.ip, ep.port),
                        })
                        .collect(),
                )
            };
            let (cluster, local) = (set(&e.cluster), set(&e.local));
            let dsr = e.lb_mode.unwrap_or(self.default_lb_mode) == LbMode::Dsr
                && {
                    // The endpoint answers from the VIP's own port: DSR needs
                    // every endpoint on the Service's port.
                    let other: Vec<u16> =
                        cluster.endpoints().iter().map(|ep| ep.port).filter(|p| *p != e.port).collect();
                    let dsr_frontends = frontends.iter().any(|f| {
                        matches!(f.kind, FrontendKind::LoadBalancer | FrontendKind::ExternalIp)
                            && e.external_policy == TrafficPolicy::Cluster
                    });
                    if dsr_frontends && !other.is_empty() && !v6 {
                        let label =
                            if e.port_name.is_empty() { format!("port {}", e.port) } else { e.port_name.clone() };
                        warnings.push(format!(
                        "Service {}/{} {label}: lb-mode dsr needs its endpoints on the Service's port {} (they use {}): \
                         served with SNAT",
                        e.namespace, e.name, e.port, other[0]
                    ));
                    }
                    other.is_empty()
                };
            out.push(ServicePort {
                id: self.ids.port(k, &e.port_name, v6),
                name: ServicePortName {
                    namespace: e.namespace.clone(),
                    name: e.name.clone(),
                    port_name: e.port_name.clone(),
                },
                proto: e.proto,
                frontends,
                external_policy: e.external_policy,
                internal_policy: e.internal_policy,
                cluster,
                local,
                affinity_timeout: e.affinity_timeout,
                source_ranges: e.source_ranges.clone(),
                health_check_node_port: e.health_check_node_port,
                dsr,
            });
        }
        out
    }
}
