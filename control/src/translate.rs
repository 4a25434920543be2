//! Kubernetes objects → service ports, as kube-proxy computes them.
//!
//! A pure function of (Services, EndpointSlices, this node's identity):
//! [`translate_service`] gives one [`PortEntry`] per port of a Service, with
//! its frontends, both traffic policies, and the Cluster and Local endpoint
//! sets of kube-proxy's `CategorizeEndpoints`:
//! - usable = ready; if no endpoint is ready, serving ∧ terminating, decided
//!   separately for the Cluster and the Local set;
//! - Local = endpoints whose `nodeName` is this node's name;
//! - the Cluster set is filtered by topology hints only when the Service opts
//!   in (`spec.trafficDistribution`, or `service.kubernetes.io/topology-mode`
//!   or its older name `topology-aware-hints` set to `Auto`/`auto`), every
//!   ready endpoint has a hint, and one hint matches this node (for
//!   `PreferSameNode`) or this zone; Local ignores hints;
//! - a set is `None` when the Service never uses it (kube-proxy's nil).
//!
//! EndpointSlice conditions default as the API says (ready unset = ready,
//! serving unset = ready, terminating unset = false); ports are matched by
//! name and protocol per slice (so a named `targetPort` resolves per slice);
//! endpoints are deduplicated across slices by address and port, keeping the
//! most usable copy. Each address family is categorized on its own, as each
//! family has its own kube-proxy. Anything invalid in a Service is reported
//! as a warning naming the object and skipped; the rest is kept.

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use xskgate_conntrack::Proto;
use xskgate_fastpath::{Cidr, FrontendKind, TrafficPolicy};

/// Who this gateway is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The node name endpoints are compared with (kube-proxy's
    /// `--hostname-override`).
    pub name: String,
    pub zone: Option<String>,
    /// The machine's hostname and addresses, for the node-name diagnosis.
    pub hostname: Option<String>,
    pub addresses: Vec<IpAddr>,
}

/// One endpoint with everything categorization needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ip: IpAddr,
    pub port: u16,
    pub node_name: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: BTreeSet<String>,
    pub node_hints: BTreeSet<String>,
}

impl EndpointInfo {
    fn usability(&self) -> u8 {
        match (self.ready, self.serving && self.terminating) {
            (true, _) => 2,
            (false, true) => 1,
            _ => 0,
        }
    }

    /// `ip:port`, IPv6 as `[ip]:port`.
    pub fn display(&self) -> String {
        endpoint_string(self.ip, self.port)
    }
}

pub fn endpoint_string(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}:{port}"),
        IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}

/// A frontend of a service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendEntry {
    pub kind: FrontendKind,
    /// `None` for a NodePort (every gateway address).
    pub address: Option<IpAddr>,
    pub port: u16,
}

/// One port of one Service, translated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortEntry {
    pub namespace: String,
    pub name: String,
    pub port_name: String,
    pub proto: Proto,
    pub port: u16,
    pub cluster_ips: Vec<IpAddr>,
    pub frontends: Vec<FrontendEntry>,
    pub external_policy: TrafficPolicy,
    pub internal_policy: TrafficPolicy,
    pub cluster: Option<Vec<EndpointInfo>>,
    pub local: Option<Vec<EndpointInfo>>,
    pub health_check_node_port: Option<u16>,
    /// Unique addresses of this node's ready endpoints, over the whole
    /// Service, per IP family.
    pub local_ready: LocalReady,
    pub affinity_timeout: Option<u32>,
    pub source_ranges: Vec<Cidr>,
    /// The Service's `xskgate.io/lb-mode` annotation; `None`: the
    /// gateway's default (`xskgate run --lb-mode`).
    pub lb_mode: Option<LbMode>,
}

/// The annotation that picks a Service's load-balancing mode.
pub const LB_MODE_ANNOTATION: &str = "xskgate.io/lb-mode";

/// How external traffic under policy Cluster reaches an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LbMode {
    /// Masquerade to the gateway (kube-proxy's way): replies come back
    /// through it.
    #[default]
    Snat,
    /// Direct server return: the client's packet encapsulated (IPIP /
    /// IP6IP6) to the endpoint, which replies straight to the client from
    /// the VIP.
    Dsr,
}

impl LbMode {
    pub fn name(self) -> &'static str {
        match self {
            LbMode::Snat => "snat",
            LbMode::Dsr => "dsr",
        }
    }

    pub fn parse(s: &str) -> Option<LbMode> {
        match s.trim() {
            "snat" => Some(LbMode::Snat),
            "dsr" => Some(LbMode::Dsr),
            _ => None,
        }
    }
}

impl std::str::FromStr for LbMode {
    type Err = String;

    fn from_str(s: &str) -> Result<LbMode, String> {
        LbMode::parse(s).ok_or_else(|| format!("{s:?} is not snat or dsr"))
    }
}

/// This node's ready endpoints of one Service (unique addresses, over all
/// its ports) per IP family; `None` for a family the Service does not have
/// (no clusterIP of it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalReady {
    pub ipv4: Option<usize>,
    pub ipv6: Option<usize>,
}

impl LocalReady {
    /// Over both families.
    pub fn total(&self) -> usize {
        self.ipv4.unwrap_or(0) + self.ipv6.unwrap_or(0)
    }

    /// What a health check asked over IPv6 (`v6`) or IPv4 reports, as
    /// kube-proxy's two per-family health servers do: that family's count;
    /// for a single-stack Service, its one family's count over either.
    pub fn asked_over(&self, v6: bool) -> usize {
        let (asked, other) = if v6 { (self.ipv6, self.ipv4) } else { (self.ipv4, self.ipv6) };
        asked.or(other).unwrap_or(0)
    }

    /// The count of one family (0 for a family the Service does not have).
    pub fn of(&self, v6: bool) -> usize {
        if v6 { self.ipv6 } else { self.ipv4 }.unwrap_or(0)
    }
}

/// Why a whole Service is not proxied (not a fault: kube-proxy skips them too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    Headless,
    ExternalName,
    /// Labelled `service.kubernetes.io/service-proxy-name`: another proxy's.
    OtherProxy,
}

pub const SERVICE_PROXY_NAME: &str = "service.kubernetes.io/service-proxy-name";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const TOPOLOGY_MODE: &str = "service.kubernetes.io/topology-mode";
const TOPOLOGY_AWARE_HINTS: &str = "service.kubernetes.io/topology-aware-hints";
const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;

/// Whether kube-proxy would skip the whole Service.
pub fn skip_reason(svc: &Service) -> Option<Skip> {
    if svc.metadata.labels.as_ref().is_some_and(|l| l.contains_key(SERVICE_PROXY_NAME)) {
        return Some(Skip::OtherProxy);
    }
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return Some(Skip::ExternalName);
    }
    if spec.cluster_ip.as_deref() == Some("None") {
        return Some(Skip::Headless);
    }
    None
}

fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim().parse().ok()
}

fn port_u16(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|p| *p != 0)
}

/// A port's protocol that xskgate does not serve.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("protocol SCTP is not supported by xskgate")]
    Sctp,
    #[error("unknown protocol {0:?}")]
    Unknown(String),
}

fn proto_of(p: Option<&str>) -> Result<Proto, ProtocolError> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(Proto::TCP),
        "UDP" => Ok(Proto::UDP),
        "SCTP" => Err(ProtocolError::Sctp),
        other => Err(ProtocolError::Unknown(other.to_string())),
    }
}

/// A line for each endpoint address of `slice` whose family is not the
/// slice's `addressType` (such an endpoint is skipped: kube-proxy's
/// proxier of one family reads only the slices of that family).
pub fn family_mismatches(slice: &EndpointSlice) -> Vec<String> {
    let v6 = match slice.address_type.as_str() {
        "IPv4" => false,
        "IPv6" => true,
        _ => return Vec::new(),
    };
    let ns = slice.metadata.namespace.as_deref().unwrap_or("default");
    let name = slice.metadata.name.as_deref().unwrap_or("");
    slice
        .endpoints
        .iter()
        .flatten()
        .filter_map(|ep| ep.addresses.first())
        .filter(|a| parse_ip(a).is_some_and(|ip| ip.is_ipv6() != v6))
        .map(|a| {
            format!(
                "EndpointSlice {ns}/{name}: addressType {} but endpoint {a} is {}; that endpoint is skipped",
                slice.address_type,
                if v6 { "IPv4" } else { "IPv6" }
            )
        })
        .collect()
}

/// The endpoints of one service port (by port name and protocol), from all
/// of the Service's slices, deduplicated.
pub fn collect_endpoints(slices: &[&EndpointSlice], port_name: &str, proto: Proto) -> Vec<EndpointInfo> {
    let mut by_key: BTreeMap<(IpAddr, u16), EndpointInfo> = BTreeMap::new();
    for slice in slices {
        let v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            _ => continue, // FQDN slices are not proxied
        };
        let Some(port) = slice.ports.iter().flatten().find_map(|p| {
            let name = p.name.as_deref().unwrap_or("");
            let matches = name == port_name && proto_of(p.protocol.as_deref()).ok() == Some(proto);
            matches.then_some(p.port).flatten().and_then(port_u16)
        }) else {
            continue;
        };
        for ep in slice.endpoints.iter().flatten() {
            let Some(ip) = ep.addresses.first().and_then(|a| parse_ip(a)) else { continue };
            if ip.is_ipv6() != v6 {
                continue;
            }
            let c = ep.conditions.as_ref();
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let info = EndpointInfo {
                ip,
                port,
                node_name: ep.node_name.clone(),
                ready,
                serving: c.and_then(|c| c.serving).unwrap_or(ready),
                terminating: c.and_then(|c| c.terminating).unwrap_or(false),
                zone_hints: ep
                    .hints
                    .iter()
                    .flat_map(|h| h.for_zones.iter().flatten())
                    .map(|z| z.name.clone())
                    .collect(),
                node_hints: ep
                    .hints
                    .iter()
                    .flat_map(|h| h.for_nodes.iter().flatten())
                    .map(|n| n.name.clone())
                    .collect(),
            };
            match by_key.get(&(ip, port)) {
                Some(old) if old.usability() >= info.usability() => {}
                _ => {
                    by_key.insert((ip, port), info);
                }
            }
        }
    }
    by_key.into_values().collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TopologyMode {
    None,
    SameZone,
    SameNode,
}

fn topology_mode(endpoints: &[EndpointInfo], node: &NodeIdentity) -> TopologyMode {
    let ready: Vec<&EndpointInfo> = endpoints.iter().filter(|e| e.ready).collect();
    if ready.is_empty() {
        return TopologyMode::None;
    }
    if ready.iter().all(|e| !e.node_hints.is_empty()) && ready.iter().any(|e| e.node_hints.contains(&node.name)) {
        return TopologyMode::SameNode;
    }
    if let Some(zone) = &node.zone
        && ready.iter().all(|e| !e.zone_hints.is_empty())
        && ready.iter().any(|e| e.zone_hints.contains(zone))
    {
        return TopologyMode::SameZone;
    }
    TopologyMode::None
}

fn available(e: &EndpointInfo, mode: TopologyMode, node: &NodeIdentity) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::SameNode => e.node_hints.contains(&node.name),
        TopologyMode::SameZone => node.zone.as_ref().is_some_and(|z| e.zone_hints.contains(z)),
    }
}

/// kube-proxy's `CategorizeEndpoints` for one address family.
fn categorize(
    endpoints: &[EndpointInfo],
    node: &NodeIdentity,
    uses_cluster: bool,
    uses_local: bool,
    topology: bool,
) -> (Option<Vec<EndpointInfo>>, Option<Vec<EndpointInfo>>) {
    let cluster = uses_cluster.then(|| {
        let mode = if topology { topology_mode(endpoints, node) } else { TopologyMode::None };
        let ready: Vec<EndpointInfo> =
            endpoints.iter().filter(|e| e.ready && available(e, mode, node)).cloned().collect();
        if ready.is_empty() {
            endpoints.iter().filter(|e| e.serving && e.terminating).cloned().collect()
        } else {
            ready
        }
    });
    let local = uses_local.then(|| {
        let is_local = |e: &&EndpointInfo| e.node_name.as_deref() == Some(node.name.as_str());
        let ready: Vec<EndpointInfo> = endpoints.iter().filter(is_local).filter(|e| e.ready).cloned().collect();
        if ready.is_empty() {
            endpoints.iter().filter(is_local).filter(|e| e.serving && e.terminating).cloned().collect()
        } else {
            ready
        }
    });
    (cluster, local)
}

fn opted_into_topology(svc: &Service) -> bool {
    let spec_says = svc.spec.as_ref().and_then(|s| s.traffic_distribution.as_deref()).is_some_and(|t| !t.is_empty());
    let annotated = svc.metadata.annotations.as_ref().is_some_and(|a| {
        let v = a.get(TOPOLOGY_MODE).or_else(|| a.get(TOPOLOGY_AWARE_HINTS));
        matches!(v.map(String::as_str), Some("Auto" | "auto"))
    });
    spec_says || annotated
}

/// Translates one Service. Returns its ports and warnings for anything
/// skipped; `Err(skip)` when kube-proxy would not proxy it at all.
pub fn translate_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &NodeIdentity,
) -> Result<(Vec<PortEntry>, Vec<String>), Skip> {
    if let Some(skip) = skip_reason(svc) {
        return Err(skip);
    }
    let namespace = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = svc.metadata.name.clone().unwrap_or_default();
    let who = format!("Service {namespace}/{name}");
    let mut warnings = Vec::new();
    let Some(spec) = svc.spec.as_ref() else {
        warnings.push(format!("{who} has no spec; skipped"));
        return Ok((Vec::new(), warnings));
    };
    let ips = |list: &[String], what: &str, warnings: &mut Vec<String>| -> Vec<IpAddr> {
        list.iter()
            .filter_map(|s| {
                let ip = parse_ip(s);
                if ip.is_none() && !s.is_empty() {
                    warnings.push(format!("{who}: {what} {s:?} is not an IP address; ignored"));
                }
                ip
            })
            .collect()
    };
    let cluster_ip_strings: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(list), _) if !list.is_empty() => list.clone(),
        (_, Some(one)) => vec![one.clone()],
        _ => Vec::new(),
    };
    let mut cluster_ips = ips(&cluster_ip_strings, "clusterIP", &mut warnings);
    // SingleStack with two families (the API server refuses it; a manifest
    // may have it): served in its primary family only, as the API server
    // would have allocated it.
    let single_family: Option<bool> = (spec.ip_family_policy.as_deref() == Some("SingleStack"))
        .then(|| {
            spec.ip_families
                .as_ref()
                .and_then(|f| f.first())
                .map(|f| f == "IPv6")
                .or_else(|| cluster_ips.first().map(IpAddr::is_ipv6))
        })
        .flatten();
    if let Some(v6) = single_family {
        let families = spec.ip_families.as_ref().map(|f| f.len()).unwrap_or(0);
        let other: Vec<String> = cluster_ips.iter().filter(|ip| ip.is_ipv6() != v6).map(|ip| ip.to_string()).collect();
        if families > 1 || !other.is_empty() {
            let (keep, skip) = if v6 { ("IPv6", "IPv4") } else { ("IPv4", "IPv6") };
            warnings.push(format!(
                "{who}: ipFamilyPolicy SingleStack with {families} ipFamilies and clusterIPs {cluster_ip_strings:?}: \
                 served as {keep} only; {skip} skipped"
            ));
        }
    }
    let of_served_family = |ip: &IpAddr| single_family.is_none_or(|v6| ip.is_ipv6() == v6);
    cluster_ips.retain(of_served_family);
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    let node_ports_allowed = matches!(svc_type, "NodePort" | "LoadBalancer");
    let lb_ips: Vec<IpAddr> = if svc_type == "LoadBalancer" {
        let ingress = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()).and_then(|l| l.ingress.as_ref());
        // kube-proxy leaves an ingress IP with ipMode Proxy to the load balancer.
        let list: Vec<String> = ingress
            .into_iter()
            .flatten()
            .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
            .filter_map(|i| i.ip.clone())
            .collect();
        ips(&list, "load balancer ingress IP", &mut warnings)
    } else {
        Vec::new()
    };
    let mut lb_ips = lb_ips;
    lb_ips.retain(of_served_family);
    let mut external_ips = ips(spec.external_ips.as_deref().unwrap_or_default(), "externalIP", &mut warnings);
    external_ips.retain(of_served_family);
    warnings.extend(slices.iter().flat_map(|sl| family_mismatches(sl)));
    let external_local = node_ports_allowed && spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let mut source_ranges = Vec::new();
    for r in spec.load_balancer_source_ranges.iter().flatten() {
        match r.trim().parse::<Cidr>() {
            Ok(c) => source_ranges.push(c),
            Err(e) => warnings.push(format!("{who}: loadBalancerSourceRange {r:?} is invalid ({e}); ignored")),
        }
    }
    let health_check_node_port =
        spec.health_check_node_port.filter(|_| external_local && svc_type == "LoadBalancer").and_then(port_u16);
    let topology = opted_into_topology(svc);
    let lb_mode = svc.metadata.annotations.as_ref().and_then(|a| a.get(LB_MODE_ANNOTATION)).and_then(|v| {
        let mode = LbMode::parse(v);
        if mode.is_none() {
            warnings.push(format!("{who}: annotation {LB_MODE_ANNOTATION}: {v:?} is not snat or dsr; ignored"));
        }
        mode
    });

    let mut entries = Vec::new();
    let mut local_ready_addresses: BTreeSet<IpAddr> = BTreeSet::new();
    for p in spec.ports.iter().flatten() {
        let port_name = p.name.clone().unwrap_or_default();
        let label = if port_name.is_empty() { format!("port {}", p.port) } else { format!("port {port_name:?}") };
        let proto = match proto_of(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(e) => {
                warnings.push(format!("{who} {label}: {e}; port skipped"));
                continue;
            }
        };
        let Some(port) = port_u16(p.port) else {
            warnings.push(format!("{who} {label}: port {} is out of range; port skipped", p.port));
            continue;
        };
        let node_port = match p.node_port.filter(|_| node_ports_allowed) {
            Some(n) => match port_u16(n) {
                Some(n) => Some(n),
                None => {
                    warnings.push(format!("{who} {label}: nodePort {n} is out of range; NodePort ignored"));
                    None
                }
            },
            None => None,
        };
        let mut frontends: Vec<FrontendEntry> = cluster_ips
            .iter()
            .map(|ip| FrontendEntry { kind: FrontendKind::ClusterIp, address: Some(*ip), port })
            .collect();
        if let Some(n) = node_port {
            frontends.push(FrontendEntry { kind: FrontendKind::NodePort, address: None, port: n });
        }
        frontends.extend(lb_ips.iter().map(|ip| FrontendEntry {
            kind: FrontendKind::LoadBalancer,
            address: Some(*ip),
            port,
        }));
        frontends.extend(external_ips.iter().map(|ip| FrontendEntry {
            kind: FrontendKind::ExternalIp,
            address: Some(*ip),
            port,
        }));

        let externally_accessible = node_port.is_some() || !lb_ips.is_empty() || !external_ips.is_empty();
        let uses_cluster = !internal_local || externally_accessible;
        let uses_local = internal_local || (external_local && externally_accessible);
        let endpoints = collect_endpoints(slices, &port_name, proto);
        for e in &endpoints {
            if e.ready && e.node_name.as_deref() == Some(node.name.as_str()) {
                local_ready_addresses.insert(e.ip);
            }
        }
        let (v4, v6): (Vec<EndpointInfo>, Vec<EndpointInfo>) =
            endpoints.into_iter().filter(|e| of_served_family(&e.ip)).partition(|e| e.ip.is_ipv4());
        let (c4, l4) = categorize(&v4, node, uses_cluster, uses_local, topology);
        let (c6, l6) = categorize(&v6, node, uses_cluster, uses_local, topology);
        let join = |a: Option<Vec<EndpointInfo>>, b: Option<Vec<EndpointInfo>>| {
            a.map(|mut a| {
                a.extend(b.unwrap_or_default());
                a.sort_by_key(|e| (e.ip.is_ipv6(), e.ip, e.port));
                a
            })
        };
        entries.push(PortEntry {
            namespace: namespace.clone(),
            name: name.clone(),
            port_name,
            proto,
            port,
            cluster_ips: cluster_ips.clone(),
            frontends,
            external_policy: if external_local { TrafficPolicy::Local } else { TrafficPolicy::Cluster },
            internal_policy: if internal_local { TrafficPolicy::Local } else { TrafficPolicy::Cluster },
            cluster: join(c4, c6),
            local: join(l4, l6),
            health_check_node_port,
            local_ready: LocalReady::default(),
            affinity_timeout,
            source_ranges: source_ranges.clone(),
            lb_mode,
        });
    }
    // The Service's families are its clusterIPs'; one without any (a
    // manifest may lack them) has its endpoints' families.
    let has = |v6: bool| {
        if cluster_ips.is_empty() {
            entries.iter().any(|e| e.cluster.iter().chain(&e.local).flatten().any(|ep| ep.ip.is_ipv6() == v6))
        } else {
            cluster_ips.iter().any(|ip| ip.is_ipv6() == v6)
        }
    };
    let count = |v6: bool| has(v6).then(|| local_ready_addresses.iter().filter(|ip| ip.is_ipv6() == v6).count());
    let local_ready = LocalReady { ipv4: count(false), ipv6: count(true) };
    for e in &mut entries {
        e.local_ready = local_ready;
    }
    Ok((entries, warnings))
}
